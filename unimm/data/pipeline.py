"""grain input pipelines: shapes / JSONL / TFDS sources -> per-process batches -> global arrays.

Each task (understanding "i2t", generation "t2i") is a finite or huge random-access list of
raw items (uint8 image + texts). Training walks it as

    range(N).shuffle(seed).repeat()  -> (stream position, item index)
      -> this process's rows of each global batch -> encode -> batch(local) -> to_iter_dataset()

so every process reads a disjoint, deterministic slice of one global stream, and the stream
position seeds per-example randomness (caption dropout): batches do not depend on how many
processes read them. The two task iterators are zipped by :class:`TrainIterator`, whose
``get_state`` / ``set_state`` hold both grain states (orbax / grain checkpoint compatible).

Imports nothing from unimm.models or unimm.train.
"""
from __future__ import annotations

import json
import os
from typing import Any
from collections.abc import Callable

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unimm.data import images, shapes, text

# understanding, generation, RecA's reconstruction (generation from the image's own
# understanding embeddings; any image source, no text needed), and planning (text only: a
# generation prompt -> the detailed description sample.plan draws from; shapes world).
TASKS = ("i2t", "t2i", "recon", "plan")
SHAPES_RANGE = 10 ** 9   # the shapes world is infinite; shuffle lazily over this many indices
GEN_KINDS = ("long_caption", "short_caption", "geneval")
CAPTION_ORDERS = ("cell", "shuffled")
I2T_KINDS = ("short_caption", "long_caption", "qa")


# ----------------------------------------------------------------------------- shapes items
# Separate rng keys (the trailing ints) keep scene, QA choice, GenEval scene and dropout
# draws independent of one another.

def shapes_i2t_item(seed: int, index: int, image_size: int) -> dict:
    """Understanding item; the task rotates over I2T_KINDS with the index."""
    scene = shapes.sample_scene(seed, index)
    kind = I2T_KINDS[index % len(I2T_KINDS)]
    qa = shapes.question_answers(scene, np.random.default_rng([seed, index]))
    if kind == "short_caption":
        question, answer = text.SHORT_CAPTION_Q, shapes.short_caption(scene)
    elif kind == "long_caption":
        question, answer = text.LONG_CAPTION_Q, shapes.long_caption(scene)
    else:
        question, answer = qa[np.random.default_rng([seed, index, 4]).integers(len(qa))]
    return {"image": shapes.render(scene, image_size), "scene": scene, "kind": kind,
            "question": question, "answer": answer, "qa": qa,
            "short_caption": shapes.short_caption(scene), "long_caption": shapes.long_caption(scene)}


def shapes_t2i_item(seed: int, index: int, image_size: int, kinds: tuple[str, ...] = GEN_KINDS,
                    caption_order: str = "cell") -> dict:
    """Generation item; the prompt rotates over ``kinds`` (default GEN_KINDS, so GenEval-style
    prompts are trained; ``("long_caption",)`` is UAE's long-caption decoder pretraining)."""
    item = shapes_prompt_scene(seed, index, kinds, caption_order)
    return {**item, "image": shapes.render(item["scene"], image_size)}


def shapes_prompt_scene(seed: int, index: int, kinds: tuple[str, ...] = GEN_KINDS,
                        caption_order: str = "cell") -> dict:
    """A generation item's prompt and scene, unrendered; ``caption_order`` "shuffled": a long
    caption names the objects in a random order (keyed by the index), not by cell."""
    kind = kinds[index % len(kinds)]
    spec = None
    if kind == "geneval":
        # geneval_prompt's category cycles with its index. The item index would visit only the
        # categories congruent to this kind's place in the rotation (two kinds: 3 of the 6),
        # so the GenEval items are numbered among themselves: every category, equally often.
        rank = index // len(kinds) * kinds.count("geneval") + kinds[:index % len(kinds)].count("geneval")
        _, prompt, spec = shapes.geneval_prompt(seed, rank)
        scene_seed = int(np.random.default_rng([seed, index, 3]).integers(2 ** 31))
        scene = shapes.scene_for_spec(spec, scene_seed)
    else:
        scene = shapes.sample_scene(seed, index)
        order = None
        if caption_order == "shuffled":
            order = np.random.default_rng([seed, index, 10]).permutation(len(scene))
        prompt = shapes.long_caption(scene, order) if kind == "long_caption" else shapes.short_caption(scene)
    return {"scene": scene, "kind": kind, "prompt": prompt, "spec": spec}


def shapes_plan_item(seed: int, index: int, kinds: tuple[str, ...] = GEN_KINDS,
                     caption_order: str = "cell") -> dict:
    """Planning item: a generation item's prompt and the long caption of its scene (a long
    caption plans to itself). ``caption_order`` "shuffled": a GenEval prompt's objects are
    described in the order it names them. The task's own shuffle pairs other items than
    generation's."""
    item = shapes_prompt_scene(seed, index, kinds, caption_order)
    if item["kind"] == "long_caption":
        return {**item, "answer": item["prompt"]}
    order = shapes.prompt_order(item["scene"], item["spec"]) if (
        caption_order == "shuffled" and item["spec"] is not None) else None
    return {**item, "answer": shapes.long_caption(item["scene"], order)}


# ----------------------------------------------------------------------------- JSONL

def _resolve(root: str, rel: Any, allow_outside: bool, where: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: 'image' must be a non-empty string path")
    path = os.path.normpath(os.path.join(root, rel))
    inside = not os.path.isabs(rel) and os.path.commonpath([root, path]) == root
    if not inside and not allow_outside:
        raise ValueError(f"{where}: image path {rel!r} escapes the JSONL folder {root} "
                         "(set data.jsonl_allow_outside_root to allow it)")
    return path


def read_jsonl(path: str, allow_outside_root: bool = False) -> list[dict]:
    """Records -> [{"image": abs path, "i2t": (question, answer) | None, "t2i": prompt | None}].

    Accepts {"image", "caption"} (both tasks), {"image", "prompt"} (generation only) and
    LLaVA {"image", "conversations": [{"from": "human"}, {"from": "gpt"}, ...]} (first pair).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL file not found: {path}")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); expected UTF-8 JSON lines") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e}); expected one JSON object per line") from None
            if not isinstance(rec, dict) or "image" not in rec:
                found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(f"{where}: expected an object with an 'image' field, found {found}")
            item = {"image": _resolve(root, rec["image"], allow_outside_root, where),
                    "i2t": None, "t2i": None, "where": where}
            if isinstance(rec.get("caption"), str):   # question None: data.caption_questions
                item["i2t"], item["t2i"] = (None, rec["caption"]), rec["caption"]
            elif isinstance(rec.get("prompt"), str):
                item["t2i"] = rec["prompt"]
            elif isinstance(rec.get("conversations"), list):
                conv = rec["conversations"]
                ok = (len(conv) >= 2 and all(isinstance(c, dict) for c in conv[:2])
                      and conv[0].get("from") == "human" and conv[1].get("from") == "gpt"
                      and all(isinstance(c.get("value"), str) for c in conv[:2]))
                if not ok:
                    raise ValueError(f"{where}: 'conversations' must start with a human turn "
                                     "and a gpt turn, each with a string 'value'")
                # The image goes first in our template; drop LLaVA's own placeholder.
                question = conv[0]["value"].replace("<image>", "").strip()
                item["i2t"] = (question, conv[1]["value"])
            else:
                raise ValueError(f"{where}: needs a string 'caption' or 'prompt', or 'conversations' "
                                 f"(found the fields {sorted(rec)})")
            out.append(item)
    if not out:
        raise ValueError(f"{path}: no records (expected one JSON object per line)")
    return out


# ----------------------------------------------------------------------------- TFDS

def _tfds_text(value: Any) -> str:
    """A caption from a text feature: str/bytes, or the first of a list of them."""
    if (isinstance(value, np.ndarray) and value.ndim > 0) or isinstance(value, (list, tuple)):
        value = value[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_get(record: dict, key: str) -> Any:
    for part in key.split("/"):   # nested features, e.g. "captions/text"
        record = record[part]
    return record


def _tfds_source(d):
    import tensorflow_datasets as tfds   # imported lazily: heavy, and only this source needs it
    return tfds.data_source(d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir or None)


def _as_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, -1)
    return img[..., :3]


# ----------------------------------------------------------------------------- sources

def batch_size(d, task: str) -> int:
    """``data.{task}_batch_size`` (an older config.json without recon gets the schema's 0)."""
    return int(d[f"{task}_batch_size"])


def prompt_kinds(d, task: str) -> tuple[str, ...]:
    """``data.{task}_prompt_kinds`` (t2i, plan): the shapes prompt kinds in rotation, checked."""
    kinds = tuple(d[f"{task}_prompt_kinds"])
    if not kinds or set(kinds) - set(GEN_KINDS):
        raise ValueError(f"data.{task}_prompt_kinds={kinds}: choose one or more of {GEN_KINDS}")
    return kinds


def task_source(d, task: str, split: str = "train") -> tuple[int, Callable[[int], dict]]:
    """(size, index -> raw item with "image" uint8 [H,W,3] and "question"/"answer" or "prompt";
    "recon" items hold the image only, "plan" items "prompt"/"answer" and no image).

    Shapes images are rendered at ``data.image_size``; JSONL / TFDS images come as stored
    (:func:`square_image` makes them the training square)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    size = d.image_size
    if d.source == "shapes":
        offset = d.eval_offset if split == "eval" else 0
        if task == "i2t":
            return SHAPES_RANGE, lambda i: shapes_i2t_item(d.seed, offset + int(i), size)
        if task == "recon":
            return SHAPES_RANGE, lambda i: {"image": shapes.render(shapes.sample_scene(d.seed, offset + int(i)), size)}
        kinds = prompt_kinds(d, task)
        order = d.caption_order
        if order not in CAPTION_ORDERS:
            raise ValueError(f"data.caption_order={order!r}: expected one of {CAPTION_ORDERS}")
        if task == "plan":
            return SHAPES_RANGE, lambda i: shapes_plan_item(d.seed, offset + int(i), kinds, order)
        return SHAPES_RANGE, lambda i: shapes_t2i_item(d.seed, offset + int(i), size, kinds, order)
    if task == "plan":
        raise ValueError(f"data.plan_batch_size > 0 needs data.source='shapes' (the scene behind each "
                         f"prompt), not {d.source!r}; set data.plan_batch_size=0 and sample.plan=False")
    if d.source == "jsonl":
        if not d.jsonl_path:
            raise ValueError("data.source='jsonl' needs data.jsonl_path")
        recs = [r for r in read_jsonl(d.jsonl_path, d.jsonl_allow_outside_root) if task == "recon" or r[task]]
        if not recs:
            raise ValueError(f"{d.jsonl_path}: no records usable for the {task} task")

        def item(i):
            r = recs[int(i)]
            try:
                img = images.load_image(r["image"])
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"{r['where']}: {e}") from None   # which record named the image
            if task == "i2t":
                return {"image": img, "question": r["i2t"][0], "answer": r["i2t"][1]}
            return {"image": img} if task == "recon" else {"image": img, "prompt": r["t2i"]}
        return len(recs), item
    if d.source == "tfds":
        if not d.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name")
        src = _tfds_source(d)

        def item(i):
            rec = src[int(i)]
            img = _as_rgb(_tfds_get(rec, d.tfds_image_key))
            if task == "recon":
                return {"image": img}
            caption = _tfds_text(_tfds_get(rec, d.tfds_text_key))
            if task == "i2t":
                return {"image": img, "question": None, "answer": caption}
            return {"image": img, "prompt": caption}
        return len(src), item
    raise ValueError(f"unknown data.source {d.source!r}; expected 'shapes', 'jsonl' or 'tfds'")


def check_data_modes(d) -> None:
    """The data fields that name a mode (checked before any example is built)."""
    for key in ("i2t_square", "t2i_square", "recon_square"):
        if d.get(key, "pad") not in images.SQUARE_MODES:
            raise ValueError(f"data.{key}={d[key]!r}: expected one of {images.SQUARE_MODES}")
    if d.caption_questions not in text.CAPTION_QUESTION_MODES:
        raise ValueError(f"data.caption_questions={d.caption_questions!r}: expected one of "
                         f"{text.CAPTION_QUESTION_MODES}")


def square_image(d, task: str, image: np.ndarray, pos: int | None) -> np.ndarray:
    """A raw item's image as the task's ``data.image_size`` square (``data.{task}_square``);
    a random crop is keyed by the stream position, a held-out item (``pos`` None) is centred."""
    mode = d[f"{task}_square"]
    if mode == "random_crop" and pos is None:
        mode = "center_crop"
    rng = None if pos is None else np.random.default_rng([d.seed, int(pos), 6])
    return images.to_square(image, d.image_size, mode, rng)


def caption_question(d, question: str | None, pos: int | None) -> str:
    """The question of an item; a caption record's (None) follows ``data.caption_questions``:
    "fixed", or one of Harmon's dense-caption prompts keyed by the stream position."""
    if question is not None:
        return question
    if d.caption_questions == "fixed" or pos is None:
        return text.CAPTION_Q if d.caption_questions == "fixed" else text.LONG_CAPTION_Q
    k = np.random.default_rng([d.seed, int(pos), 7]).integers(len(text.DENSE_CAPTION_QS))
    return text.DENSE_CAPTION_QS[k]


def example_encoder(d, tok, task: str, item_fn: Callable[[int], dict]):
    """(stream position, item index) -> model-ready example with task-prefixed keys."""
    check_data_modes(d)
    if task == "recon":
        instructions = text.load_instructions(d.recon_instructions)
        text.check_instructions_fit(tok, instructions, d.num_image_tokens, d.recon_seq_len)

    def encode(pos_and_index):
        pos, index = pos_and_index
        item = item_fn(index)
        if task == "plan":
            ex = text.plan_example(tok, item["prompt"], item["answer"], d.plan_seq_len)
            return {"plan_tokens": ex["tokens"], "plan_targets": ex["targets"], "plan_mask": ex["mask"]}
        image = images.to_model(square_image(d, task, item["image"], pos))
        if task == "i2t":
            question = caption_question(d, item["question"], pos)
            ex = text.i2t_example(tok, question, item["answer"], d.num_image_tokens, d.i2t_seq_len)
            return {"i2t_images": image, "i2t_tokens": ex["tokens"],
                    "i2t_targets": ex["targets"], "i2t_mask": ex["mask"]}
        # Dropout keyed by stream position: independent of the process count, and a
        # finite source's record is not dropped identically in every epoch.
        drop = np.random.default_rng([d.seed, int(pos), 5 if task == "t2i" else 8]).random() < d.cfg_drop_prob
        if task == "recon":
            # One instruction per example, as RecA draws from its list; keyed by stream position.
            k = np.random.default_rng([d.seed, int(pos), 9]).integers(len(instructions))
            ex = text.recon_example(tok, instructions[k], d.num_image_tokens, d.recon_seq_len, bool(drop))
            return {"recon_images": image, "recon_tokens": ex["tokens"], "recon_mask": ex["mask"]}
        ex = text.t2i_example(tok, item["prompt"], d.max_t2i_len, bool(drop))
        return {"t2i_images": image, "t2i_tokens": ex["tokens"], "t2i_mask": ex["mask"]}
    return encode


def fit_images(config) -> np.ndarray:
    """The first ``data.code_fit_images`` training images (the generation task's squares, in
    [-1, 1]): what a fitted tokenizer (``model.vae.code_dim``) is fitted on, the same at every
    start of a run and of its inference."""
    d = config.data
    n, item_fn = task_source(d, "recon", "train")
    count = min(int(d.code_fit_images), n)
    if count < 1:
        raise ValueError(f"data.code_fit_images={d.code_fit_images}: model.vae.code_dim needs images to fit on")
    return np.stack([images.to_model(square_image(d, "t2i", item_fn(i)["image"], None)) for i in range(count)])


def process_slice(stream: grain.MapDataset, global_size: int, start: int, size: int) -> grain.MapDataset:
    """Rows ``[start, start + size)`` of every global batch of ``stream``, in order.

    Contiguous blocks (not ``stream[p::P]``): the global batch assembled from the processes'
    blocks is then the same rows in the same order for every process count, so a run on
    2 processes x 4 devices computes exactly what 1 process x 8 devices does."""
    def position(j: int) -> int:
        return (j // size) * global_size + start + j % size
    return grain.MapDataset.range(len(stream) // global_size * size).map(lambda j: stream[position(j)])


def task_dataset(config, tok, task: str, *, process_index: int, process_count: int,
                 split: str = "train") -> grain.IterDataset | None:
    """The per-process batched IterDataset for one task, or None when its batch size is 0."""
    d = config.data
    global_size = batch_size(d, task)
    if global_size <= 0:
        return None
    if global_size % process_count:
        raise ValueError(f"data.{task}_batch_size {global_size} is not divisible by "
                         f"{process_count} processes")
    n, item_fn = task_source(d, task, split)
    seed = d.seed + TASKS.index(task)   # a different order for each task
    stream = (grain.MapDataset.range(n).shuffle(seed=seed).repeat()
              .map_with_index(lambda pos, i: (pos, i)))
    local = global_size // process_count
    ds = process_slice(stream, global_size, local * process_index, local)
    ds = ds.map(example_encoder(d, tok, task, item_fn))
    ds = ds.batch(local, drop_remainder=True)
    if d.read_threads < 0 or d.prefetch_batches < 0:
        raise ValueError(f"data.read_threads ({d.read_threads}) and data.prefetch_batches "
                         f"({d.prefetch_batches}) must be >= 0")
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch_batches))
    if d.worker_count:
        # Worker processes (grain mp_prefetch) read absl flags: run under absl.app.run.
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    return ds


class TrainIterator(grain.DatasetIterator):
    """Zips the task iterators into one batch dict; state = {task: grain state}."""

    def __init__(self, iters: dict):
        super().__init__(tuple(iters.values()))
        self._iters = iters

    def __next__(self) -> dict:
        batch = {}
        for it in self._iters.values():
            batch.update(next(it))
        return batch

    def get_state(self) -> dict:
        return {task: it.get_state() for task, it in self._iters.items()}

    def set_state(self, state: dict) -> None:
        if set(state) != set(self._iters):
            raise ValueError(f"iterator state has tasks {sorted(state)}, expected {sorted(self._iters)}")
        for task, it in self._iters.items():
            it.set_state(state[task])


def make_train_iterator(config, tok, *, process_index: int | None = None,
                        process_count: int | None = None, split: str = "train") -> TrainIterator:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    iters = {}
    for task in TASKS:
        ds = task_dataset(config, tok, task, process_index=process_index,
                          process_count=process_count, split=split)
        if ds is not None:
            iters[task] = iter(ds)
    if not iters:
        raise ValueError(f"every task's batch size is 0 ({', '.join(f'data.{t}_batch_size' for t in TASKS)})")
    return TrainIterator(iters)


def eval_examples(config, tok, n: int, task: str) -> list[dict]:
    """n held-out raw items (shapes: indices from data.eval_offset), each with its encoded
    "example" (i2t: tokens/targets/mask; t2i: the undropped prompt tokens/mask).

    task "i2t" / "t2i" as in training; "geneval": GenEval-style prompts only (with "spec").
    JSONL / TFDS have no held-out indices: their first n items of the configured split are used.
    """
    d = config.data
    if task == "geneval":
        if d.source != "shapes":
            raise ValueError("eval task 'geneval' needs data.source='shapes'")
        # Consecutive indices cycle through the six categories (balanced for any n >= 6).
        out = []
        for i in range(d.eval_offset, d.eval_offset + n):
            cat, prompt, spec = shapes.geneval_prompt(d.seed, i)
            out.append({"index": i, "category": cat, "prompt": prompt, "spec": spec,
                        "example": text.t2i_example(tok, prompt, d.max_t2i_len, False)})
        return out
    _, item_fn = task_source(d, task, "eval")
    out = []
    for i in range(n):
        item = dict(item_fn(i), index=i)
        item["image"] = square_image(d, task, item["image"], None)
        if task == "i2t":
            item["question"] = caption_question(d, item["question"], None)
            item["example"] = text.i2t_example(tok, item["question"], item["answer"],
                                               d.num_image_tokens, d.i2t_seq_len)
        else:
            item["example"] = text.t2i_example(tok, item["prompt"], d.max_t2i_len, False)
        out.append(item)
    return out


def global_batch(local_batch: dict, mesh) -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded over ("data", "fsdp") on dim 0."""
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
