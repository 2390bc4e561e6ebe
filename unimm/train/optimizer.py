"""The optimizer: AdamW (MAR/Harmon recipe) with warmup + cosine, clipping, weight-decay
and trainability masks, all from optax."""
from __future__ import annotations

from typing import Any

import jax
import optax


def _top_key(path) -> str:
    return str(getattr(path[0], "key", path[0])) if path else ""


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on 1-D params (biases, norms) nor the diffusion
    head (MAR's recipe)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim > 1 and _top_key(path) != "head", params)


def trainable_labels(params: Any, frozen: tuple[str, ...]) -> Any:
    """``"frozen"`` for every leaf under a top-level key in ``frozen``, else ``"train"``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _top_key(path) in frozen else "train", params)


def scale_group(group: str, factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of one top-level param group by ``factor``: that group's
    learning rate (weight decay included) is ``factor`` times the schedule's."""
    return optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(
        lambda path, u: u * factor if _top_key(path) == group else u, updates))


def learning_rate(opt: Any, total_steps: int) -> optax.Schedule:
    warmup = max(int(opt.warmup_fraction * total_steps), 1) if opt.warmup_fraction else 0
    if opt.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), optax.constant_schedule(opt.lr)],
                                    [warmup]) if warmup else optax.constant_schedule(opt.lr)
    if opt.schedule != "cosine":
        raise ValueError(f"optimizer.schedule={opt.schedule!r}: expected 'cosine' or 'constant'")
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.lr, warmup, max(total_steps, warmup + 1), end_value=opt.lr * opt.final_lr_fraction)


def make_optimizer(opt: Any, total_steps: int,
                   frozen: tuple[str, ...] = ()) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``opt`` = ``config.optimizer``; ``frozen`` = top-level param groups that get no update."""
    schedule = learning_rate(opt, total_steps)
    head_scale = float(opt.head_lr_scale)
    parts = [optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip else optax.identity(),
             optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                         mask=decay_mask)]
    if head_scale != 1.0:   # appended only when used: the optimizer state keeps its structure otherwise
        parts.append(scale_group("head", head_scale))
    adamw = optax.chain(*parts)
    if not frozen:
        return adamw, schedule
    tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               lambda p: trainable_labels(p, frozen))
    return tx, schedule
