"""The unified shapes benchmark: understanding, generation and reconstruction, all scored
exactly through the shapes world's detector on held-out indices.

* ``caption_exact_match`` — the model's long caption of a held-out image parses back to the
  image's exact scene (every object's size, colour, shape and cell).
* ``short_caption_exact_match`` — the short caption equals the reference string.
* ``qa_accuracy`` — exact answers to the world's questions.
* ``geneval`` — per GenEval category and ``overall``: the detector's scene of an image
  generated from the prompt satisfies the prompt's spec.
* ``reconstruction`` — image -> model's long caption -> generated image -> detector: the
  detected scene equals the source scene.
* ``unified_bench`` — UAE's Unified-Bench on the same reconstructions: per image encoder,
  the mean cosine of source and reconstruction features, and ``overall`` (their mean).
  ``config.eval.unified_bench`` names the built-in encoders (``mar``: the evaluated
  model's MAR encoder, mean-pooled; ``latent``: the image tokenizer's latents); callers
  add any JAX image encoder through ``feature_encoders``.
"""
from __future__ import annotations

import collections
from typing import Any
from collections.abc import Sequence

import jax
import numpy as np

from unimm.data import pipeline, shapes, text
from unimm.eval import rewards
from unimm.inference.model import Model


def _batched(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


UNIFIED_BENCH_ENCODERS = ("mar", "latent")


def builtin_encoders(model: Model, names: Sequence[str]) -> dict:
    """Image encoders ``uint8 [B, H, W, 3] -> [B, ...]`` for the Unified-Bench score."""
    size, out = model.config.data.image_size, {}
    for name in names:
        if name == "mar":
            out[name] = rewards.mar_features(model.params, model.cfg, model.tokenizer_params, size)
        elif name == "latent":
            out[name] = rewards.tokenizer_latents(model.cfg, model.tokenizer_params, size)
        else:
            raise ValueError(f"eval.unified_bench: unknown encoder {name!r}; built in: {UNIFIED_BENCH_ENCODERS}")
    return out


def unified_bench(source: np.ndarray, generated: np.ndarray, encoders: dict) -> dict:
    """Per encoder the mean cosine of source and generated features, and their mean."""
    scores = {name: float(np.mean(rewards.cosine(fn(source), fn(generated)))) for name, fn in encoders.items()}
    if scores:
        scores["overall"] = float(np.mean(list(scores.values())))
    return scores


def evaluate(model: Model, num_examples: int = 60, batch_size: int = 12, seed: int = 0,
             feature_encoders: dict | None = None) -> tuple[dict, dict]:
    """Scores on ``num_examples`` held-out items per task; returns ``(metrics, samples)``
    where ``samples`` holds image grids and a few texts for writing. ``feature_encoders``
    (name -> images -> features) join the configured built-in ones in ``unified_bench``."""
    config, tok = model.config, model.tok
    if config.data.source != "shapes":
        raise ValueError("the shapes benchmark needs data.source='shapes'")
    rng = jax.random.key(seed)
    items = pipeline.eval_examples(config, tok, num_examples, "i2t")
    long_caps, short_caps, qa_hits, qa_total = [], [], 0, 0
    for chunk in _batched(items, batch_size):
        imgs = [it["image"] for it in chunk]
        long_caps += model.answer(imgs, [text.LONG_CAPTION_Q] * len(chunk))
        short_caps += model.answer(imgs, [text.SHORT_CAPTION_Q] * len(chunk))
        qs = [it["qa"][k % len(it["qa"])] for k, it in enumerate(chunk)]
        answers = model.answer(imgs, [q for q, _ in qs])
        qa_hits += sum(a.strip() == want for a, (_, want) in zip(answers, qs))
        qa_total += len(qs)

    def parses_to(caption: str, scene) -> bool:
        try:
            return shapes.parse_long_caption(caption) == scene
        except ValueError:
            return False

    caption_ok = [parses_to(c, it["scene"]) for c, it in zip(long_caps, items)]
    metrics = {
        "caption_exact_match": float(np.mean(caption_ok)),
        "short_caption_exact_match": float(np.mean([c == it["short_caption"] for c, it in zip(short_caps, items)])),
        "qa_accuracy": qa_hits / max(qa_total, 1),
    }

    # Reconstruction: the model's own long captions drive generation.
    recon_imgs = []
    for k, chunk in enumerate(_batched(long_caps, batch_size)):
        recon_imgs.append(model.generate(chunk, jax.random.fold_in(rng, k)))
    recon_imgs = np.concatenate(recon_imgs)
    recon_ok = [shapes.detect(im) == it["scene"] for im, it in zip(recon_imgs, items)]
    metrics["reconstruction"] = float(np.mean(recon_ok))
    encoders = builtin_encoders(model, config.eval.unified_bench)
    encoders.update(feature_encoders or {})
    metrics["unified_bench"] = unified_bench(np.stack([it["image"] for it in items]), recon_imgs, encoders)

    gen_items = pipeline.eval_examples(config, tok, num_examples, "geneval")
    drawn = [model.generate_with_plans([g["prompt"] for g in chunk], jax.random.fold_in(rng, 1000 + k))
             for k, chunk in enumerate(_batched(gen_items, batch_size))]
    gen_imgs, drawn_from = np.concatenate([d[0] for d in drawn]), [p for d in drawn for p in d[1]]
    detected = [shapes.detect(im) for im in gen_imgs]
    gen_ok = [shapes.check_geneval(g["spec"], d) for d, g in zip(detected, gen_items)]
    metrics["geneval"] = _by_category(gen_items, gen_ok)
    # Which part of the prompts fails: the number of objects, or the shapes named.
    diagnosis = [shapes.geneval_diagnosis(g["spec"], d) for d, g in zip(detected, gen_items)]
    metrics["geneval_diagnosis"] = {k: _by_category(gen_items, [d[k] for d in diagnosis])
                                    for k in ("object_count", "named_shapes")}

    samples = {
        # Each generated image under its prompt, framed by whether the GenEval check passed.
        "geneval_grid": labeled_grid(gen_imgs[:16], [g["prompt"] for g in gen_items[:16]], gen_ok[:16]),
        # Each input image beside the image drawn from the model's caption of it (the label),
        # framed by whether the detected scenes agree.
        "reconstruction_grid": labeled_grid(
            [im for it, r in zip(items[:8], recon_imgs[:8]) for im in (it["image"], r)],
            [t for it, c in zip(items[:8], long_caps[:8]) for t in ("input", c)],
            [ok for same in recon_ok[:8] for ok in (None, same)]),
        "captions": [{"reference": it["long_caption"], "model": c} for it, c in zip(items[:5], long_caps[:5])],
        "prompts": [g["prompt"] for g in gen_items[:16]],
    }
    if model.config.sample.plan:   # what each GenEval image was drawn from (sample.plan)
        samples["plans"] = drawn_from[:16]
    return metrics, samples


def _by_category(items: list[dict], hits: list[bool]) -> dict[str, float]:
    """The share of ``hits`` per GenEval category, and ``overall``: their mean (GenEval's)."""
    per_cat = collections.defaultdict(list)
    for hit, g in zip(hits, items):
        per_cat[g["category"]].append(hit)
    shares = {cat: float(np.mean(v)) for cat, v in sorted(per_cat.items())}
    return {**shares, "overall": float(np.mean(list(shares.values())))}


def image_grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """``[N, H, W, 3]`` uint8 -> one ``[rows*H, cols*W, 3]`` grid (black padding)."""
    n, h, w, c = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
    return grid


def labeled_grid(images, labels: list[str], passed: list[bool | None] | None = None, cols: int = 4,
                 cell: int = 96, text_lines: int = 4) -> np.ndarray:
    """Each image scaled to ``cell`` px (nearest: the pixels as drawn) above its label
    (wrapped to ``text_lines`` lines), framed green if its check ``passed``, red if not (no
    frame where ``passed`` is None); returns one uint8 ``[H, W, 3]`` image."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=10)   # a scalable font where Pillow has FreeType
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    line_h, pad = 12, 3
    tile_w, tile_h = cell + 2 * pad, cell + 2 * pad + text_lines * line_h + 2
    n = len(images)
    cols = min(cols, n)
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def wrap(label: str) -> list[str]:
        lines = [""]
        for word in label.split():
            grown = f"{lines[-1]} {word}".strip()
            if lines[-1] and draw.textlength(grown, font=font) > cell:
                lines.append(word)
            else:
                lines[-1] = grown
        return lines[:text_lines]

    for i, (im, label) in enumerate(zip(images, labels)):
        r, q = divmod(i, cols)
        x, y = q * tile_w, r * tile_h
        if passed is not None and passed[i] is not None:
            color = (0, 160, 0) if passed[i] else (200, 0, 0)
            draw.rectangle([x, y, x + tile_w - 1, y + cell + 2 * pad - 1], fill=color)
            label = ("PASS: " if passed[i] else "FAIL: ") + label
        canvas.paste(Image.fromarray(np.asarray(im, np.uint8)).resize((cell, cell), Image.NEAREST), (x + pad, y + pad))
        for k, line in enumerate(wrap(label)):
            draw.text((x + pad, y + cell + 2 * pad + k * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def flat_scalars(metrics: dict, prefix: str = "eval/") -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flat_scalars(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
