"""Tokenizers behind one interface: a built-in word vocabulary (the shapes world) and a
local Hugging Face ``tokenizer.json`` (Qwen2.5) through the ``tokenizers`` library.

Both expose ``encode``, ``decode``, ``vocab_size`` and the ids of the special tokens the
models need: ``pad_id``, ``eos_id`` (``<|im_end|>``, which ends an assistant turn) and
``image_id`` (the ``<image>`` placeholder replaced by image embeddings).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

IM_START, IM_END, ENDOFTEXT, IMAGE, PAD, UNK = (
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<pad>", "<unk>")
SPECIAL_TOKENS = (PAD, UNK, ENDOFTEXT, IM_START, IM_END, IMAGE)
CHAT_TEMPLATE = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"

# Specials, newlines, words (letters/digits, inner hyphens or apostrophes), single symbols.
_PIECES = re.compile(r"<\|[a-z_]+\|>|<image>|<pad>|<unk>|\n|[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


def chat_prompt(text: str) -> str:
    """The Qwen2.5 chat template around one user turn, ready for the assistant's answer."""
    return CHAT_TEMPLATE.format(input=text)


class WordTokenizer:
    """Lower-cased word-level tokenizer over a fixed vocabulary; specials come first."""

    def __init__(self, vocab: Sequence[str]):
        if len(set(vocab)) != len(vocab):
            raise ValueError("WordTokenizer: the vocabulary has duplicate entries")
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"WordTokenizer: the vocabulary lacks the special tokens {missing}")
        self.vocab = list(vocab)
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.unk_id = self._ids[PAD], self._ids[UNK]
        self.eos_id, self.image_id = self._ids[IM_END], self._ids[IMAGE]
        self.im_start_id = self._ids[IM_START]

    @classmethod
    def from_words(cls, words: Iterable[str]) -> WordTokenizer:
        """Specials + chat-template words + every piece of ``words`` (sorted, deduplicated)."""
        pieces = set(_PIECES.findall(" ".join(words).lower())) | {"user", "assistant", "\n"}
        return cls(list(SPECIAL_TOKENS) + sorted(pieces - set(SPECIAL_TOKENS)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(p, self.unk_id) for p in _PIECES.findall(text.lower())]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out, prev = "", None
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"WordTokenizer.decode: id {i} outside the vocabulary of {len(self.vocab)}")
            tok = self.vocab[i]
            if skip_special and tok in SPECIAL_TOKENS:
                continue
            # A space only between a word and what precedes it, never around specials/newlines.
            space = prev is not None and prev != "\n" and prev not in SPECIAL_TOKENS \
                and tok not in SPECIAL_TOKENS and tok[0].isalnum()
            out += " " + tok if space else tok
            prev = tok
        return out.strip(" ")


class HFTokenizer:
    """A local ``tokenizer.json`` (e.g. Qwen2.5's) via the ``tokenizers`` library; no downloads."""

    def __init__(self, path: str, image_token: str = IMAGE):
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
        if self._tok.token_to_id(image_token) is None:
            # Harmon's placeholder is not in Qwen's vocabulary: add it as a special token
            # (it never reaches the LLM's embedding table; its slots get image embeddings).
            self._tok.add_special_tokens([image_token])
        ids = {t: self._tok.token_to_id(t) for t in (IM_END, ENDOFTEXT, image_token)}
        if ids[IM_END] is None:
            raise ValueError(f"{file}: no {IM_END} token; expected a Qwen2-style chat vocabulary")
        self.eos_id, self.image_id = ids[IM_END], ids[image_token]
        self.pad_id = ids[ENDOFTEXT] if ids[ENDOFTEXT] is not None else self.eos_id
        self.im_start_id = self._tok.token_to_id(IM_START)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)
