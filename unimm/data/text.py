"""Token sequences for the two tasks, and the shapes world's vocabulary.

* understanding (I2T): ``chat_prompt("<image>\\n" + question) + answer + "<|im_end|>"`` with
  the ``<image>`` token expanded to one placeholder per image token; loss on the answer only.
* generation (T2I): ``chat_prompt("Generate an image: {prompt}")`` (Harmon's template), or
  the unconditional prompt for classifier-free-guidance dropout.
* planning (``sample.plan``): ``chat_prompt("Describe in detail the image: {prompt}")`` +
  the long caption of a scene that fits the prompt; text only, loss on the description.
* reconstruction (RecA): the understanding prompt of an instruction, its ``<image>`` slots
  holding the image's own understanding embeddings; the generation path redraws that image.

Works with either tokenizer of ``unimm.data.tokenizer``; imports nothing from models/train.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

from unimm.data import shapes
from unimm.data.tokenizer import CHAT_TEMPLATE, IMAGE, WordTokenizer, chat_prompt

GEN_TEMPLATE = "Generate an image: {prompt}"
UNCOND_PROMPT = "Generate an image."
# Words of the shapes vocabulary only: a new word would renumber every trained tokenizer.
PLAN_TEMPLATE = "Describe in detail the image: {prompt}"
SHORT_CAPTION_Q = "Describe the image briefly."
LONG_CAPTION_Q = "Describe the image in detail."
CAPTION_Q = "Describe the image."          # JSONL / TFDS captions used as understanding data
# Harmon's dense-caption prompts (src/datasets/understanding/caption_prompts.py): its caption
# datasets ask one of them at random per example (data.caption_questions="harmon").
DENSE_CAPTION_QS = (
    "Describe the image in detail.",
    "Provide a comprehensive description of everything you see in the picture.",
    "Explain the scene depicted in the image as if you were describing it to someone who cannot see it.",
    "List all the objects and activities taking place in this image.",
    "What is the story being told by this image? Describe in detail.",
    "Imagine you are giving a detailed tour of the image's scene. How would you describe it?",
    "Describe the foreground, background, and any notable features of the image.",
    "How would you describe this image to build a replica of the scene?",
    "Write a paragraph detailing the setting, characters, and actions visible in this image.",
    "Describe every aspect of the image, including the environment, objects, and any people present.",
    "Provide a detailed analysis of the composition and elements of the image.",
    "What are the main focal points of this image? Describe them in detail.",
    "Catalog all visible elements in the image and describe their significance to the overall scene.",
)
CAPTION_QUESTION_MODES = ("fixed", "harmon")
# RecA's instruction (its list asks, in many words, for a detailed description of the image).
RECON_INSTRUCTION = LONG_CAPTION_Q
FIXED_TEXTS = (GEN_TEMPLATE.format(prompt=""), UNCOND_PROMPT, SHORT_CAPTION_Q, LONG_CAPTION_Q,
               CAPTION_Q, "nothing", "an empty image.")

# The chat template split around the user text, so a truncated prompt keeps its tail.
_HEAD, _TAIL = CHAT_TEMPLATE.split("{input}")


# ----------------------------------------------------------------------------- vocabulary

def shapes_texts(seed: int, index: int) -> list[str]:
    """Every text the shapes pipeline can emit for one (seed, index)."""
    scene = shapes.sample_scene(seed, index)
    qa = shapes.question_answers(scene, np.random.default_rng([seed, index]))
    texts = [shapes.short_caption(scene), shapes.long_caption(scene),
             shapes.geneval_prompt(seed, index)[1]]
    return texts + [t for pair in qa for t in pair]


def shapes_tokenizer() -> WordTokenizer:
    """Word vocabulary covering the shapes world; same list on every run (from_words sorts)."""
    words = list(FIXED_TEXTS)
    # The constants give every content word; plurals and articles come from the templates.
    words += list(shapes.SHAPES) + [s + "s" for s in shapes.SHAPES] + list(shapes.COLORS)
    words += list(shapes.SIZES) + list(shapes.POSITIONS) + list(shapes.NUMBER_WORDS)
    words += list(shapes.RELATIONS) + ["a", "an", "and", "yes", "no"]
    # Generated text supplies the template words (questions, "at the", "a photo of", ...).
    for i in range(600):
        words += shapes_texts(0, i)
    return WordTokenizer.from_words(words)


# ----------------------------------------------------------------------------- user text

def check_text(value: str, what: str) -> str:
    """A user's prompt / question: valid UTF-8 (command-line bytes that are not arrive as
    surrogate escapes) and not empty. ``what`` names it in the error (``--prompt #2``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(value[e.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ValueError(f"{what} is not valid UTF-8 ({byte} at position {e.start}); expected UTF-8 "
                         "text") from None
    if not value.strip():
        raise ValueError(f"{what} is empty; expected some text")
    return value


def read_lines(path: str, what: str = "prompt file") -> list[str]:
    """Non-blank lines of a UTF-8 text file; errors name the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); expected UTF-8 text") from None
            if line.strip():
                out.append(line.rstrip("\r\n"))
    if not out:
        raise ValueError(f"{path}: no prompts (expected one per line)")
    return out


def t2i_length(tok, prompt: str) -> int:
    """Tokens of the generation prompt with its chat template (what ``t2i_example`` packs)."""
    return len(tok.encode(_HEAD + GEN_TEMPLATE.format(prompt=prompt))) + len(tok.encode(_TAIL))


def sampling_prompt_limit(config) -> int:
    """The longest generation prompt (chat template included) the LLM's context holds beside
    the image tokens; Harmon's sampler truncates nothing below it either."""
    return int(config.model.llm.max_position_embeddings) - int(config.data.num_image_tokens)


def sampling_prompt_len(tok, prompts: list[str], config) -> int:
    """Prompt rows for sampling: the longest prompt, at least ``data.max_t2i_len`` (one
    program for every batch of shorter prompts), at most :func:`sampling_prompt_limit`
    (longer prompts lose their end)."""
    longest = max([int(config.data.max_t2i_len)] + [t2i_length(tok, p) for p in prompts])
    return min(longest, sampling_prompt_limit(config))


def fit_question(tok, question: str, num_image_tokens: int, max_prompt_len: int) -> tuple[str, int]:
    """``(question, prompt length)``: the question cut at its end (at token boundaries) so that
    the understanding prompt with its image tokens has at most ``max_prompt_len`` tokens."""
    n = len(i2t_prompt_ids(tok, question, num_image_tokens))
    if n <= max_prompt_len:
        return question, n
    ids = tok.encode(question)
    keep = len(ids) - (n - max_prompt_len)
    while keep > 0:
        cut = tok.decode(ids[:keep])
        if len(i2t_prompt_ids(tok, cut, num_image_tokens)) <= max_prompt_len:
            return cut, n
        keep -= 1
    raise ValueError(f"the understanding prompt needs {n - len(ids)} tokens without any question "
                     f"({num_image_tokens} image tokens), more than the {max_prompt_len} available")


# ----------------------------------------------------------------------------- examples

def _pad(ids: list[int], max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full(max_len, pad_id, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros(max_len, np.int32)
    mask[:len(ids)] = 1
    return tokens, mask


def i2t_prompt_ids(tok, question: str, num_image_tokens: int) -> list[int]:
    """The understanding prompt with its ``<image>`` expanded to ``num_image_tokens`` slots."""
    prompt = tok.encode(chat_prompt(IMAGE + "\n" + question))
    if prompt.count(tok.image_id) != 1:
        raise ValueError(f"i2t prompt: expected exactly one {IMAGE} in the prompt, found "
                         f"{prompt.count(tok.image_id)} (question {question!r})")
    k = prompt.index(tok.image_id)
    return prompt[:k] + [tok.image_id] * num_image_tokens + prompt[k + 1:]


def i2t_loss_start(tok, num_image_tokens: int) -> int:
    """The first position of an understanding sequence that can carry a target: every prompt
    starts with the chat template's head and the image slots, and answers follow the prompt."""
    head = i2t_prompt_ids(tok, "", num_image_tokens)
    return head.index(tok.image_id) + num_image_tokens


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``tokens, mask`` int32 [N, max len] for incremental decoding."""
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return tokens, mask


def i2t_example(tok, question: str, answer: str, num_image_tokens: int, max_len: int) -> dict:
    """tokens / targets / mask, int32 [max_len]; targets[t] = tokens[t+1] on answer positions."""
    return _answered(tok, i2t_prompt_ids(tok, question, num_image_tokens), answer, max_len,
                     f"i2t_example (incl. {num_image_tokens} image tokens)")


def plan_prompt_ids(tok, prompt: str) -> list[int]:
    """The planning prompt: the generation prompt inside :data:`PLAN_TEMPLATE`, no image."""
    return tok.encode(chat_prompt(PLAN_TEMPLATE.format(prompt=prompt)))


def plan_example(tok, prompt: str, description: str, max_len: int) -> dict:
    """A planning example (tokens / targets / mask, int32 [max_len]): loss on the description."""
    return _answered(tok, plan_prompt_ids(tok, prompt), description, max_len,
                     "plan_example (raise data.plan_seq_len)")


def _answered(tok, prompt: list[int], answer: str, max_len: int, what: str) -> dict:
    answer_ids = tok.encode(answer) + [tok.eos_id]
    ids = prompt + answer_ids
    if len(ids) > max_len:
        # Never truncate silently: a cut answer teaches the model to stop mid-sentence.
        raise ValueError(f"{what}: sequence of {len(ids)} tokens (prompt {len(prompt)} + answer "
                         f"{len(answer_ids)}) exceeds max_len {max_len}")
    tokens, mask = _pad(ids, max_len, tok.pad_id)
    targets = np.full(max_len, -1, np.int32)
    # Position t predicts token t+1: the last prompt position predicts the first answer token.
    targets[len(prompt) - 1:len(ids) - 1] = answer_ids
    return {"tokens": tokens, "targets": targets, "mask": mask}


def recon_example(tok, instruction: str, num_image_tokens: int, max_len: int, drop: bool) -> dict:
    """tokens / mask, int32 [max_len]: RecA's prompt, the understanding prompt of
    ``instruction`` with ``num_image_tokens`` image slots. ``drop`` (CFG dropout) replaces the
    instruction by the unconditional prompt and keeps the image, as RecA does."""
    ids = i2t_prompt_ids(tok, UNCOND_PROMPT if drop else instruction, num_image_tokens)
    if len(ids) > max_len:
        raise ValueError(f"recon_example: prompt of {len(ids)} tokens ({num_image_tokens} image tokens) "
                         f"exceeds max_len {max_len}; raise data.recon_text_len")
    tokens, mask = _pad(ids, max_len, tok.pad_id)
    return {"tokens": tokens, "mask": mask}


def load_instructions(path: str) -> tuple[str, ...]:
    """Reconstruction instructions from ``path``: a JSON list of strings, or one instruction
    per line (blank lines skipped); "" gives the built-in ``(RECON_INSTRUCTION,)``."""
    if not path:
        return (RECON_INSTRUCTION,)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"data.recon_instructions={path!r}: cannot read it ({e})") from None
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.recon_instructions={path!r}: not a JSON list ({e})") from None
        if not all(isinstance(x, str) and x.strip() for x in items):
            raise ValueError(f"data.recon_instructions={path!r}: the JSON list must hold non-empty strings")
        items = [x.strip() for x in items]
    else:
        items = [line.strip() for line in raw.splitlines() if line.strip()]
    if not items:
        raise ValueError(f"data.recon_instructions={path!r} holds no instruction")
    return tuple(items)


def check_instructions_fit(tok, instructions: tuple[str, ...], num_image_tokens: int, max_len: int) -> None:
    """One error naming the ``data.recon_text_len`` (``max_len`` less the image tokens) that
    the longest instruction's prompt needs."""
    need, longest = max((len(i2t_prompt_ids(tok, s, num_image_tokens)), s) for s in (UNCOND_PROMPT, *instructions))
    if need > max_len:
        raise ValueError(f"data.recon_text_len={max_len - num_image_tokens} is too short: the reconstruction prompt of "
                         f"{longest[:60]!r} takes {need - num_image_tokens} tokens beside the "
                         f"{num_image_tokens} image tokens; set data.recon_text_len >= "
                         f"{need - num_image_tokens}")


def t2i_example(tok, prompt: str, max_len: int, drop: bool) -> dict:
    """tokens / mask, int32 [max_len]; overlong prompts lose their end, never the template tail."""
    text = UNCOND_PROMPT if drop else GEN_TEMPLATE.format(prompt=prompt)
    head, tail = tok.encode(_HEAD + text), tok.encode(_TAIL)
    if len(head) + len(tail) > max_len:
        if max_len - len(tail) <= len(tok.encode(_HEAD)):
            raise ValueError(f"t2i_example: max_len {max_len} cannot hold the chat template")
        logging.warning("t2i_example: prompt of %d tokens truncated to max_len %d: %r",
                        len(head) + len(tail), max_len, prompt[:80])
        head = head[:max_len - len(tail)]
    tokens, mask = _pad(head + tail, max_len, tok.pad_id)
    return {"tokens": tokens, "mask": mask}


def t2i_rows(tok, prompts: list[str], max_len: int, guided: bool) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's prompt rows, tokens / mask int32 ``[N or 2N, max_len]``: the prompts, then
    (``guided``, i.e. CFG) one unconditional row per prompt."""
    rows = [t2i_example(tok, p, max_len, False) for p in prompts]
    if guided:
        rows += [t2i_example(tok, "", max_len, True)] * len(prompts)
    return np.stack([r["tokens"] for r in rows]), np.stack([r["mask"] for r in rows])
