"""Harmon inference as single jitted programs with static shapes.

* :func:`generate_image_tokens` — text -> image tokens by masked-autoregressive iterations
  (cosine schedule, random orders, CFG with the unconditional prompt, per-token diffusion
  sampling). The schedule depends only on ``(num_iter, seq_len)``, so it is precomputed;
  each iteration samples a window of the order, not all ``L`` tokens. Consecutive
  iterations share static sizes (:func:`window_groups`: a few groups, so the head's rows
  follow the tokens each iteration draws, and the encoder's and LLM's rows the tokens drawn
  before it); one ``lax.scan`` per group, in one compiled program: no Python dispatch or
  recompilation per iteration.
* :func:`caption` — image -> text by greedy / sampled decoding with the KV cache.
"""
from __future__ import annotations

import functools
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimm.models import gaussian_diffusion, harmon, layers, mar, qwen2


def mask_schedule(num_iter: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step: tokens still masked after it (0 at the last step: it predicts the rest) and
    the clamped schedule value the linear CFG schedule uses (as the reference's ``mask_len``)."""
    target = mar.mask_len_schedule(num_iter, seq_len)
    remaining, after, cfg_len = seq_len, [], []
    for s in range(num_iter):
        m = max(1, min(remaining - 1, int(target[s])))
        cfg_len.append(m)
        after.append(0 if s == num_iter - 1 else m)
        remaining = after[-1]
    return np.asarray(after, np.int32), np.asarray(cfg_len, np.int32)


def window_groups(counts: Sequence[int], visible: Sequence[int], max_groups: int, row_cost: float,
                  overhead: float = 0.02) -> list[tuple[int, int, int, int]]:
    """Consecutive iterations grouped under one static size each: ``[(start, stop, window,
    keep)]``, at most ``max_groups`` groups. ``window``: the group's largest count of tokens
    to draw (the diffusion head's rows); ``keep``: its largest count of tokens already drawn
    (the MAR encoder's and the LLM's image rows; at least 1). Minimizes ``sum((stop - start) *
    (row_cost * window + keep))``, ``row_cost`` being one head row's work in units of one
    image row's, plus ``overhead`` times the one-group work for every group (each is one more
    compiled loop body, seconds of compilation: worth it only where it saves that much of
    every call); ties go to fewer groups."""
    n, k_max = len(counts), max(1, min(int(max_groups), len(counts)))

    def work(i, j):
        return (j - i) * (row_cost * max(counts[i:j]) + max(1, max(visible[i:j])))

    per_group = overhead * work(0, n)

    def cost(i, j):
        return work(i, j) + per_group

    # best[k][j]: (cost, groups) of the first j iterations in at most k groups.
    best = [[(0.0, 0)] + [(float("inf"), 0)] * n for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            best[k][j], cut[k][j] = best[k - 1][j], -1         # -1: no group added
            for i in range(j):
                cand = (best[k - 1][i][0] + cost(i, j), best[k - 1][i][1] + 1)
                if cand < best[k][j]:
                    best[k][j], cut[k][j] = cand, i
    out, k, j = [], k_max, n
    while j:
        if cut[k][j] < 0:
            k -= 1
            continue
        i = cut[k][j]
        out.append((i, j, int(max(counts[i:j])), max(1, int(max(visible[i:j])))))
        k, j = k - 1, i
    return out[::-1]


def head_row_cost(cfg: Any, num_steps: int) -> float:
    """One head row over ``num_steps`` diffusion steps, in units of one image row's pass
    through the MAR encoder and the LLM (matmul FLOPs; the two share the batch layout)."""
    d, llm, m = cfg.diffusion, cfg.llm, cfg.mar
    head = d.depth * 5 * d.width ** 2                      # adaLN (3 w^2) + MLP (2 w^2) per block
    attn = llm.hidden_size * llm.head_dim * (2 * llm.num_heads + 2 * llm.num_kv_heads)
    image = llm.num_layers * (attn + 3 * llm.hidden_size * llm.intermediate_size) \
        + m.encoder_depth * 12 * m.width ** 2
    return num_steps * head / image


def _fill(tokens: jax.Array, pos: jax.Array, valid: jax.Array, values: jax.Array) -> jax.Array:
    """``tokens[b, pos[b, w]] = values[b, w]`` where ``valid``; comparison + gather (no scatter)."""
    hit = (pos[:, :, None] == jnp.arange(tokens.shape[1])[None, None, :]) & valid[:, :, None]
    row = jnp.argmax(hit, axis=1)
    new = jnp.take_along_axis(values, row[..., None], axis=1)
    return jnp.where(hit.any(axis=1)[..., None], new.astype(tokens.dtype), tokens)


def rows_to_batch(x: jax.Array, b: int, w: int) -> jax.Array:
    """A recorded step's sampler layout ``[S, b*W, ...]`` -> batch-leading ``[b, S, W, ...]``."""
    return jnp.moveaxis(x.reshape(x.shape[0], b, w, *x.shape[2:]), 1, 0)


@functools.partial(jax.jit, static_argnums=1, static_argnames=(
    "num_iter", "guided", "cfg_schedule", "num_steps", "final_steps", "grid", "record", "max_windows"))
def generate_image_tokens(params: dict, cfg: Any, tokens: jax.Array, mask: jax.Array, rng: jax.Array,
                          *, num_iter: int, guided: bool, cfg_scale=1.0, cfg_schedule: str = "constant",
                          temperature=1.0, num_steps: str | None = None, final_steps: int = 0,
                          grid: int | None = None, record: bool = False, max_windows: int = 1):
    """Image tokens ``[B, L, D]`` for prompts ``tokens/mask [B', T]`` (1 = real token);
    ``tokens`` may be prompt embeddings ``[B', T, H]`` instead (RecA's image prompts).

    ``guided``: rows are ``[cond (B); uncond (B)]`` (B' = 2B), sharing orders, masks and
    noise; ε is guided with ``cfg_scale`` (constant or Muse's linear schedule). Otherwise
    B' = B and ``cfg_scale`` is unused. ``grid``: tokens per side (default ``cfg.mar.grid``;
    larger for stage-3 resolutions, with interpolated position embeddings).

    ``final_steps`` (DiSA, 0 = off): the diffusion steps annealed linearly from ``num_steps``
    at the first iteration to ``final_steps`` at the last (later tokens are better
    determined by those drawn before them); each iteration's head work is its own count.

    ``max_windows``: how many groups of static sizes (head window, visible rows) the
    iterations may use (:func:`window_groups`; one loop body compiled per group). A token's
    noise does not depend on its window and padding rows are masked, so any value draws the
    same image (to float rounding).

    ``record``: returns ``(tokens, trajectory)``, the trajectory batch-leading (one row per
    image, for GRPO): per iteration ``masked [B, I, L]`` (before it), ``pos / pos_valid
    [B, I, W]`` (the tokens it draws), ``scale [B, I]`` (its CFG scale), and per diffusion
    step (first = noisiest) ``t [B, I, S]`` and ``x / x_next [B, I, S, W, D]`` in the head's
    space (before any readout offset).
    """
    if cfg_schedule not in ("constant", "linear"):
        raise ValueError(f"cfg_schedule={cfg_schedule!r}: expected 'constant' or 'linear'")
    m = cfg.mar
    seq, dim = (grid or m.grid) ** 2, m.token_dim
    rows = tokens.shape[0]
    b = rows // 2 if guided else rows
    after, cfg_len = mask_schedule(num_iter, seq)
    before = np.concatenate([[seq], after[:-1]])
    window = int((before - after).max())
    steps = gaussian_diffusion.sampling_steps(cfg.diffusion, num_steps)
    steps = (steps + final_steps) / 2 if final_steps else steps      # DiSA: about the mean count
    groups = [(0, num_iter, window, seq)] if record else window_groups(
        before - after, seq - before, max_windows, head_row_cost(cfg, steps))
    after_j, before_j, cfg_len_j = map(jnp.asarray, (after, before, cfg_len))

    annealed = None
    if final_steps:
        if record:
            raise ValueError("diffusion step annealing (final_steps) records no trajectory: its iterations "
                             "differ in length")
        first = cfg.diffusion.num_sampling_steps if num_steps is None else num_steps
        counts = gaussian_diffusion.annealed_steps(num_iter, first, final_steps)
        tables = jax.tree.map(jnp.asarray, gaussian_diffusion.stacked_schedules(cfg.diffusion, counts))
        annealed = (tables, jnp.asarray(counts, jnp.int32))

    k_order, k_loop = jax.random.split(rng)
    orders = mar.random_orders(k_order, b, seq)
    ranks = jnp.argsort(orders, axis=-1)
    # Padded so a window starting near the end is never clamped (its tail is invalid anyway).
    orders_padded = jnp.concatenate([orders, orders[:, :window]], axis=1)
    text_mask = mask.astype(bool)
    cache = prefill(params, cfg, tokens, text_mask, seq)
    head_cfg = harmon.head_config(cfg)
    both = (lambda x: jnp.concatenate([x, x])) if guided else (lambda x: x)

    def body(carry, s, win, group_cache):
        img, masked, key = carry
        key, k_diff = jax.random.split(key)
        z = cached_condition(params, cfg, group_cache, text_mask, both(img), both(masked))
        # The tokens this step predicts: ranks [after[s], before[s]) of each order.
        pos = jax.lax.dynamic_slice_in_dim(orders_padded, after_j[s], win, axis=1)
        pos_valid = jnp.arange(pos.shape[1])[None, :] < (before_j[s] - after_j[s])
        z_win = jnp.take_along_axis(z, both(pos)[..., None], axis=1)             # [B', W, Cd]
        scale = cfg_scale if cfg_schedule == "constant" else \
            1.0 + (cfg_scale - 1.0) * (seq - cfg_len_j[s]) / seq
        z_rows = z_win.reshape(-1, z_win.shape[-1])
        schedule = None if annealed is None else (
            jax.tree.map(lambda table: table[s], annealed[0]), annealed[1][s])
        x0, _, *traj = gaussian_diffusion.sample(
            params["head"], head_cfg, cfg.diffusion, z_rows, k_diff,
            temperature=temperature, cfg_scale=scale, guided=guided, num_steps=num_steps,
            return_trajectory=record, schedule=schedule, noise=functools.partial(window_noise, b=b, window=window,
                                                                                 win=win))
        x0 = x0 + harmon.head_offset(params, cfg, z_rows, guided, scale)
        img = _fill(img, pos, pos_valid, x0.reshape(b, -1, dim))
        step = None
        if record:
            traj = traj[0]
            step = {"masked": masked, "pos": pos, "pos_valid": jnp.broadcast_to(pos_valid, pos.shape),
                    "scale": jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (b,)),
                    "t": jnp.broadcast_to(traj["t"], (b, traj["t"].shape[0])),
                    "x": rows_to_batch(traj["x"], b, window), "x_next": rows_to_batch(traj["x_next"], b, window)}
        return (img, ranks < after_j[s], key), step

    carry = (jnp.zeros((b, seq, dim), jnp.float32), jnp.ones((b, seq), bool), k_loop)
    for start, stop, win, keep in groups:
        # Sliced once per group, outside its loop: the cache holds the prompt, then ``keep`` rows.
        group_cache = [{k: v[:, :text_mask.shape[1] + keep + cfg.mar.buffer_size] for k, v in layer.items()}
                       for layer in cache]
        carry, trajectory = jax.lax.scan(functools.partial(body, win=win, group_cache=group_cache), carry,
                                         jnp.arange(start, stop))
    if not record:
        return carry[0]
    return carry[0], jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), trajectory)      # [B, I, ...]


def window_noise(key: jax.Array, shape: tuple, *, b: int, window: int, win: int) -> jax.Array:
    """Standard normal noise for ``b * win`` head rows, drawn for the largest ``window`` and cut
    to each image's first ``win`` rows: a token's noise does not depend on its group's window."""
    return jax.random.normal(key, (b, window, shape[-1]))[:, :win].reshape(shape)


def prefill(params: dict, cfg: Any, tokens: jax.Array, text_mask: jax.Array, seq: int) -> list:
    """The prompts' KV cache, sized for the prompt (ids or embeddings) + ``seq`` image tokens
    + the buffers."""
    rows, t_len = tokens.shape[:2]
    cache = qwen2.init_cache(cfg.llm, rows, t_len + seq + cfg.mar.buffer_size, jnp.dtype(cfg.llm.dtype))
    kv = jnp.concatenate([text_mask, jnp.zeros((rows, seq + cfg.mar.buffer_size), bool)], axis=1)
    _, cache = qwen2.forward(params["llm"], cfg.llm, tokens, qwen2.positions_from_mask(text_mask), kv, cache=cache)
    return cache


def cached_condition(params: dict, cfg: Any, cache: list, text_mask: jax.Array, img: jax.Array,
                     masked: jax.Array) -> jax.Array:
    """One MAR iteration's condition ``z [B, L, Cd]``: the visible tokens of ``img`` (``masked``
    False) through the MAR encoder, the LLM after the cached prompt, and the MAR decoder. The
    cache's length sets how many visible tokens it holds: the prompt, then that many rows and
    the buffers (:func:`prefill`'s: all ``L``)."""
    m, buf = cfg.mar, cfg.mar.buffer_size
    t_len = text_mask.shape[1]
    keep = cache[0]["k"].shape[1] - t_len - buf
    idx, valid = mar.gather_visible(masked, keep)
    x_enc, z_enc = harmon.visual_features(params, cfg, img, idx, valid)
    kv_mask = jnp.concatenate([text_mask, harmon.image_kv_mask(valid, buf)], axis=1)
    positions = jnp.maximum(jnp.cumsum(kv_mask, axis=1) - 1, 0)[:, t_len:]
    hidden, _ = qwen2.forward(params["llm"], cfg.llm, z_enc.astype(jnp.dtype(cfg.llm.dtype)), positions,
                              kv_mask, cache=cache, cache_offset=t_len)   # cache not kept
    z_llm = harmon.buffer_to_start(hidden, buf)
    return mar.decode(params["mar"], m, x_enc + harmon.project_out(params, cfg, z_llm), idx, valid,
                      grid=mar.grid_for(m, img.shape[1]))


def caption(params: dict, cfg: Any, tokens: jax.Array, mask: jax.Array, image_tokens: jax.Array,
            image_id: int, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int | None = None,
            temperature: float = 0.0, rng: jax.Array | None = None, **decoding) -> jax.Array:
    """Left-padded prompts with ``<image>`` slots -> prompt + generated ids ``[B, T + N]``, as
    Harmon's ``llm.generate(inputs_embeds=...)``; ``decoding``: ``qwen2.generate``'s
    ``top_k``, ``top_p``, ``repetition_penalty`` (over the generated ids, as HF with embeds)."""
    embeds = _understanding_embeds(params, layers.freeze(cfg), jnp.asarray(tokens), image_tokens, image_id)
    return qwen2.generate(params["llm"], cfg.llm, tokens, max_new_tokens, temperature=temperature, rng=rng,
                          attention_mask=mask, eos_token_id=eos_id, pad_token_id=pad_id, inputs_embeds=embeds,
                          **decoding)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _understanding_embeds(params, cfg, tokens, image_tokens, image_id):
    return harmon.understanding_embeds(params, cfg, tokens, image_tokens, image_id)
