"""Periodic evaluation during training and the ``eval.json`` writer.

``make_eval_fn(config, workdir)`` returns the loop's hook ``eval_fn(state, step, writer)``:
it scores the EMA params on the shapes benchmark, writes the scalars and image grids to
the metric writer (TensorBoard), the grids as PNG files and ``eval.json`` in the workdir.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging
from PIL import Image

from unimm import resolve
from unimm.eval import shapes_bench
from unimm.inference.model import Model


def write_results(workdir: str, step: int, metrics: dict, samples: dict, writer: Any = None,
                  prefix: str = "", settings: dict | None = None) -> str:
    """``eval.json`` (+ ``eval_<step>.json``) and PNG grids in ``workdir``, their names
    prefixed with ``prefix`` (e.g. ``validation_``); returns the json path. ``settings`` (e.g.
    the sampling settings scored) join the record."""
    os.makedirs(workdir, exist_ok=True)
    record = {"step": int(step), **(settings or {}), **metrics, "captions": samples.get("captions", []),
              "prompts": samples.get("prompts", []), **({"plans": samples["plans"]} if "plans" in samples else {})}
    for name in (f"{prefix}eval.json", f"{prefix}eval_{int(step)}.json"):
        with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    grids = {k: v for k, v in samples.items() if k.endswith("_grid")}
    for name, grid in grids.items():
        Image.fromarray(grid).save(os.path.join(workdir, f"{prefix}{name}_{int(step)}.png"))
    if writer is not None:
        writer.write_scalars(int(step), shapes_bench.flat_scalars(metrics))
        writer.write_images(int(step), {f"eval/{k}": v[None] for k, v in grids.items()})
        writer.flush()
    return os.path.join(workdir, f"{prefix}eval.json")


def summary_line(metrics: dict) -> str:
    g = metrics["geneval"]
    return (f"caption_exact_match={metrics['caption_exact_match']:.3f} qa_accuracy={metrics['qa_accuracy']:.3f} "
            f"geneval={g['overall']:.3f} reconstruction={metrics['reconstruction']:.3f} "
            f"unified_bench={metrics.get('unified_bench', {}).get('overall', float('nan')):.3f} "
            f"(" + " ".join(f"{k}={v:.2f}" for k, v in g.items() if k != "overall") + ")"
            + "".join(f" geneval_{k}={v['overall']:.2f}" for k, v in metrics.get("geneval_diagnosis", {}).items()))


def make_eval_fn(config: Any, workdir: str, tok: Any = None, num_examples: int | None = None,
                 decoder_params: Any = None, encoder_params: Any = None):
    """``eval_fn(state, step, writer)`` on the EMA params; ``decoder_params`` (GRPO's frozen
    decoder) generate the images instead when given, ``encoder_params`` (the decoder policy's
    frozen captioner) caption and answer instead when given."""
    if config.data.source != "shapes":
        logging.info("data.source=%s: the shapes benchmark is skipped", config.data.source)
        return None
    if jax.process_count() > 1:
        logging.info("%d processes: evaluation during training is skipped; run "
                     "python -m unimm.evaluate --workdir=%s afterwards", jax.process_count(), workdir)
        return None
    tok = resolve.make_tokenizer(config) if tok is None else tok
    config = resolve.resolve(config, tok, check=False)
    n = num_examples or config.eval.num_examples

    def eval_fn(state: Any, step: int, writer: Any = None) -> dict:
        model = Model(config, tok, state.ema_params if encoder_params is None else encoder_params,
                                   state.tokenizer_params,
                                   decoder_params=state.ema_params if decoder_params is None else decoder_params)
        metrics, samples = shapes_bench.evaluate(model, num_examples=n, batch_size=config.eval.batch_size,
                                                 seed=int(step))
        write_results(workdir, step, metrics, samples, writer)
        logging.info("eval step %d: %s", step, summary_line(metrics))
        print(f"eval step {int(step)}: {summary_line(metrics)}", flush=True)
        return metrics

    return eval_fn
