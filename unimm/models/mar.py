"""MAR encoder/decoder (LTH14/mar ``models/mar.py``, Harmon's variant) with static shapes.

The reference drops masked tokens with a data-dependent ``nonzero``; here the visible
tokens are gathered into a fixed number ``K`` of rows (:func:`gather_visible`) and padded
rows are hidden from attention by a key mask, so one compiled program serves every mask
ratio whose visible count fits in ``K``. Buffer rows (``buffer_size`` of them) hold
``fake_latent`` (or a caller's embedding) and come first in encoder and decoder.

Public compute is pure: ``encode(params, cfg, ...)`` / ``decode(params, cfg, ...)`` with
``params`` the pure dict of :class:`MAR` (``layers.init_params(MAR, cfg, rng)``).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.models.layers import attention, attention_impl, bind, layer_norm, linear, normal, param, shard_batch

# --------------------------------------------------------------------------- modules


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout (torch ``nn.Dropout`` in train mode); identity without ``rng``."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nnx.Module):
    """timm ``Attention``: fused qkv with bias, softmax(q k^T / sqrt(d)) v, output proj."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None, implementation=None):
        self.num_heads, self.implementation = num_heads, implementation
        self.qkv = linear(dim, 3 * dim, ("embed", "qkv"), rngs=rngs, dtype=dtype)
        self.proj = linear(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, key_mask: jax.Array | None = None, rate: float = 0.0,
                 rng: jax.Array | None = None) -> jax.Array:
        b, n, c = x.shape
        # torch packs the channels as (3, heads, head_dim).
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).transpose(2, 0, 1, 3, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if rng is None or rate == 0.0:
            valid = jnp.ones((b, n), bool) if key_mask is None else key_mask
            out = attention(q, k, v, mask, self.implementation, valid=valid)
        else:   # timm's attn_drop on the probabilities: the explicit form
            k_attn, rng = jax.random.split(rng)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1])).astype(q.dtype)
            if mask is not None:
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            probs = dropout(jax.nn.softmax(logits, axis=-1), rate, k_attn)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return dropout(self.proj(out.reshape(b, n, c)), rate, rng)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
        self.fc1 = linear(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = linear(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x, rate: float = 0.0, rng: jax.Array | None = None):
        k1, k2 = jax.random.split(rng) if rng is not None else (None, None)
        h = dropout(jax.nn.gelu(self.fc1(x), approximate=False), rate, k1)  # nn.GELU() is exact erf
        return dropout(self.fc2(h), rate, k2)


class Block(nnx.Module):
    """timm ``Block`` (pre-norm attention + MLP). Dropout (``rate``, timm's attn_drop and
    proj_drop; Harmon trains with 0.1) applies only when an ``rng`` is given: training."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, *, rngs: nnx.Rngs,
                 dtype=None, implementation=None):
        self.norm1 = layer_norm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype, implementation=implementation)
        self.norm2 = layer_norm(dim, rngs=rngs, eps=eps, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)

    def __call__(self, x, key_mask=None, rate: float = 0.0, rng: jax.Array | None = None):
        k_attn, k_mlp = jax.random.split(rng) if rng is not None else (None, None)
        x = shard_batch(x)
        x = x + self.attn(self.norm1(x), key_mask, rate, k_attn)
        return x + self.mlp(self.norm2(x), rate, k_mlp)


def _blocks(blocks, x, key_mask, cfg, dropout_rng):
    rate = float(cfg.dropout)
    for i, block in enumerate(blocks):
        rng = None if dropout_rng is None or rate == 0.0 else jax.random.fold_in(dropout_rng, i)
        x = block(x, key_mask, rate, rng)
    return x


class MAR(nnx.Module):
    """Parameters of the MAR encoder/decoder; ``cfg`` = a config's ``model.mar`` (configs/harmon.py)."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        c, cd, eps = cfg.width, cfg.decoder_width, cfg.layer_norm_eps
        seq, buf = cfg.grid * cfg.grid, cfg.buffer_size
        dt = jnp.dtype(cfg.dtype)
        impl = attention_impl(cfg.attention, "model.mar.attention")
        emb = normal(0.02)
        pos = normal(cfg.pos_embed_init_std)
        self.fake_latent = param(rngs, emb, (1, c), (None, "embed"))
        self.z_proj = linear(cfg.token_dim, c, ("token", "embed"), rngs=rngs, dtype=dt)
        self.z_proj_ln = layer_norm(c, rngs=rngs, eps=eps, dtype=dt)
        self.encoder_pos_embed_learned = param(rngs, pos, (1, seq + buf, c), (None, "seq", "embed"))
        self.encoder_blocks = nnx.List([Block(c, cfg.num_heads, cfg.mlp_ratio, eps, rngs=rngs, dtype=dt,
                                              implementation=impl)
                                        for _ in range(cfg.encoder_depth)])
        self.encoder_norm = layer_norm(c, rngs=rngs, eps=eps, dtype=dt)
        self.decoder_embed = linear(c, cd, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.mask_token = param(rngs, emb, (1, 1, cd), (None, None, "embed"))
        self.decoder_pos_embed_learned = param(rngs, pos, (1, seq + buf, cd), (None, "seq", "embed"))
        self.decoder_blocks = nnx.List([Block(cd, cfg.num_heads, cfg.mlp_ratio, eps, rngs=rngs, dtype=dt,
                                              implementation=impl)
                                        for _ in range(cfg.decoder_depth)])
        self.decoder_norm = layer_norm(cd, rngs=rngs, eps=eps, dtype=dt)
        self.diffusion_pos_embed_learned = param(rngs, emb, (1, seq, cd), (None, "seq", "embed"))


# ------------------------------------------------------------------ position embeddings


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's 1-D linear interpolation with align_corners=False."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)  # torch clamps at 0
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def resize_pos_embed(pe: jax.Array, src: tuple[int, int], dst: tuple[int, int]) -> jax.Array:
    """Bilinearly resizes ``pe [B, h*w, C]`` from grid ``src`` to ``dst``.

    Matches ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing, unlike
    ``jax.image.resize`` when shrinking) with separable interpolation matrices.
    """
    if tuple(src) == tuple(dst):
        return pe
    (h0, w0), (h, w) = src, dst
    wh = jnp.asarray(_bilinear_matrix(h0, h), pe.dtype)
    ww = jnp.asarray(_bilinear_matrix(w0, w), pe.dtype)
    grid = pe.reshape(pe.shape[0], h0, w0, pe.shape[-1])
    out = jnp.einsum("yh,xw,bhwc->byxc", wh, ww, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(pe.shape[0], h * w, pe.shape[-1])


def _grid(cfg, grid) -> tuple[int, int]:
    return (cfg.grid, cfg.grid) if grid is None else tuple(grid)


def grid_for(cfg, seq_len: int) -> tuple[int, int] | None:
    """The square token grid of ``seq_len`` image tokens: None at the native ``cfg.grid``,
    else ``(s, s)`` for the position-embedding resize (stage 3's higher resolution)."""
    if seq_len == cfg.grid ** 2:
        return None
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"{seq_len} image tokens do not form a square grid")
    return side, side


def _with_buffer_pe(pe: jax.Array, cfg, grid) -> jax.Array:
    """``[1, buffer + h*w, C]`` position embedding: buffer rows as is, image rows resized."""
    buf = cfg.buffer_size
    img = resize_pos_embed(pe[:, buf:], (cfg.grid, cfg.grid), _grid(cfg, grid))
    return jnp.concatenate([pe[:, :buf], img], axis=1)


# ------------------------------------------------------------------- encoder / decoder


def gather_visible(mask: jax.Array, num_keep: int) -> tuple[jax.Array, jax.Array]:
    """Positions of the visible tokens (``mask == 0``) in raster order, padded to ``num_keep``.

    Returns ``idx int32 [B, K]`` and ``valid bool [B, K]``. ``idx`` is the head of a stable
    permutation, so its entries are distinct and padded rows point at masked positions.
    ``num_keep`` must be at least the number of visible tokens of every row.
    """
    idx = jnp.argsort(mask.astype(jnp.int32), axis=-1, stable=True)[:, :num_keep].astype(jnp.int32)
    n_vis = jnp.sum(mask == 0, axis=-1, keepdims=True)
    return idx, jnp.arange(num_keep)[None, :] < n_vis


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def encode(params: Any, cfg: Any, tokens: jax.Array, idx: jax.Array, valid: jax.Array, *,
           buffer_embed: jax.Array | None = None, grid: tuple[int, int] | None = None,
           dropout_rng: jax.Array | None = None) -> jax.Array:
    """MAR encoder on the visible tokens: ``tokens [B, L, D]`` -> ``[B, buffer + K, C]``.

    ``buffer_embed [B, C]`` fills the buffer rows (default ``fake_latent``, as Harmon does).
    Rows past a sample's visible count are padding: they attend but are never attended to.
    ``dropout_rng`` (training) turns on the blocks' ``cfg.dropout``.
    """
    m = bind(MAR, cfg, params)
    b, buf = tokens.shape[0], cfg.buffer_size
    pe = _with_buffer_pe(m.encoder_pos_embed_learned[...], cfg, grid)
    if buffer_embed is None:
        buffer_embed = jnp.broadcast_to(m.fake_latent[...], (b, cfg.width))
    # Every op before the blocks is per token, so gathering first is the reference's
    # "add pos, layer-norm, drop masked" on K rows instead of L.
    head = jnp.broadcast_to(buffer_embed[:, None, :], (b, buf, cfg.width)) + pe[:, :buf]
    body = m.z_proj(_take_rows(tokens, idx)) + jnp.take(pe[0, buf:], idx, axis=0)
    x = m.z_proj_ln(jnp.concatenate([head.astype(body.dtype), body], axis=1))
    key_mask = jnp.concatenate([jnp.ones((b, buf), bool), valid], axis=1)
    return m.encoder_norm(_blocks(m.encoder_blocks, x, key_mask, cfg, dropout_rng))


def decode(params: Any, cfg: Any, x_enc: jax.Array, idx: jax.Array, valid: jax.Array, *,
           grid: tuple[int, int] | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
    """MAR decoder: ``x_enc [B, buffer + K, C]`` -> diffusion condition ``z [B, L, Cd]``.

    Every image slot starts as the mask token; valid encoder rows are scattered back into
    their positions (padded rows write the mask token into their own masked slot).
    """
    m = bind(MAR, cfg, params)
    h, w = _grid(cfg, grid)
    buf = cfg.buffer_size
    x = m.decoder_embed(x_enc)
    mask_token = m.mask_token[...].astype(x.dtype)
    # Slot -> encoder row by comparison + gather, not a scatter: XLA's SPMD partitioner
    # mis-partitions this batched scatter on a batch-sharded mesh (wrong rows on CPU).
    hit = (idx[:, :, None] == jnp.arange(h * w)[None, None, :]) & valid[:, :, None]   # [B, K, L]
    row_of_slot = jnp.argmax(hit, axis=1)                                              # [B, L]
    rows = jnp.take_along_axis(x[:, buf:], row_of_slot[..., None], axis=1)
    img = jnp.where(hit.any(axis=1)[..., None], rows, mask_token)
    x = jnp.concatenate([x[:, :buf], img], axis=1) + _with_buffer_pe(m.decoder_pos_embed_learned[...], cfg, grid)
    x = m.decoder_norm(_blocks(m.decoder_blocks, x, None, cfg, dropout_rng))[:, buf:]
    return x + resize_pos_embed(m.diffusion_pos_embed_learned[...], (cfg.grid, cfg.grid), (h, w))


# --------------------------------------------------------------------------- masking


def random_orders(rng: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """One random permutation of ``range(seq_len)`` per row: ``int32 [B, L]``."""
    return jnp.argsort(jax.random.uniform(rng, (batch, seq_len)), axis=-1).astype(jnp.int32)


MASK_RATIO_STD = 0.25   # MAR's scale of the training mask ratio (model.mar.mask_ratio_std)


MASK_RATIO_DISTS = ("truncnorm", "cosine", "uniform")
LOSS_WEIGHTINGS = ("token", "example")


def loss_weights(mask: jax.Array, weighting: str) -> jax.Array:
    """Per-token loss weights ``[B, L]`` from the training mask: 1 on masked tokens ("token"),
    or ``1 / masked count`` of the image ("example": every image weighs the same)."""
    w = mask.astype(jnp.float32)
    if weighting == "example":
        w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)
    return w


def late_loss_weights(mask: jax.Array, weights: jax.Array, max_ratio: float,
                      late_weight: float) -> tuple[jax.Array, jax.Array | float]:
    """``(head_weights, scale)``: ``weights`` (per-token, as :func:`loss_weights`) plus a second
    term, the mean over the masked tokens of the images with at most ``max_ratio`` of their
    tokens masked (what the last sampling iterations draw), times ``late_weight``. The weighted
    mean of the per-token losses under ``head_weights``, times ``scale``, is
    ``mean + late_weight * late mean`` (the first term unchanged); ``late_weight`` 0 returns
    ``(weights, 1.0)``."""
    if late_weight <= 0:
        return weights, 1.0
    m = mask.astype(jnp.float32)
    count = m.sum(axis=1, keepdims=True)
    late = m * ((count > 0) & (count <= max_ratio * mask.shape[1] + 1e-4))
    head = weights / jnp.maximum(weights.sum(), 1e-12) + late_weight * late / jnp.maximum(late.sum(), 1.0)
    return head, head.sum()


def sample_mask_ratio(rng: jax.Array, min_ratio: float, std: float = MASK_RATIO_STD, shape: tuple = (),
                      dist: str = "truncnorm") -> jax.Array:
    """Mask ratios in ``[min_ratio, 1]`` of ``shape``: MAR's truncated normal (loc 1.0, scale
    ``std``), MaskGIT's ``cos(pi/2 * u)`` for uniform ``u`` (the ratios the cosine sampling
    schedule visits, equally often) clipped from below at ``min_ratio``, or uniform (every
    count of masked tokens equally often: the states of a sampler that draws one token per
    iteration)."""
    if dist == "uniform":
        return jax.random.uniform(rng, shape, minval=min_ratio, maxval=1.0)
    if dist == "cosine":
        return jnp.maximum(min_ratio, jnp.cos(0.5 * jnp.pi * jax.random.uniform(rng, shape)))
    return 1.0 + std * jax.random.truncated_normal(rng, (min_ratio - 1.0) / std, 0.0, shape)


def num_masked(seq_len: int, ratio: jax.Array) -> jax.Array:
    """``ceil(seq_len * ratio)`` as int32 (works on traced ratios)."""
    return jnp.clip(jnp.ceil(seq_len * ratio), 0, seq_len).astype(jnp.int32)


def mask_by_order(mask_len: jax.Array, orders: jax.Array) -> jax.Array:
    """``bool [B, L]``: the first ``mask_len`` positions of each order are masked.

    ``mask_len`` may be traced (scalar or ``[B]``); the rank of every position in its
    order is compared with it, so shapes never depend on the value.
    """
    ranks = jnp.argsort(orders, axis=-1)
    return ranks < jnp.reshape(jnp.asarray(mask_len), (-1, 1))


def max_visible_for_training(seq_len: int, min_ratio: float) -> int:
    """The static ``K`` for training: the most tokens a sampled mask ratio leaves visible.

    A small tolerance keeps ``K`` an upper bound when ``seq_len * min_ratio`` sits on an
    integer and float32 rounding lands just below it. At least 1, so a ratio that masks
    everything still has a (fully padded) buffer to gather into.
    """
    return max(1, seq_len - math.ceil(seq_len * min_ratio - 1e-4))


def loss_row_sizes(seq_len: int, min_ratio: float, buckets: int) -> tuple[int, ...]:
    """Static per-example row counts for the diffusion loss (``model.diffusion.loss_row_buckets``):
    ``buckets`` sizes evenly spaced from the fewest tokens a training mask masks to
    ``seq_len``; () for one bucket (every token, as MAR)."""
    if buckets <= 1:
        return ()
    fewest = seq_len - max_visible_for_training(seq_len, min_ratio)
    return tuple(sorted({math.ceil(fewest + (seq_len - fewest) * j / buckets) for j in range(1, buckets + 1)}))


def mask_len_schedule(num_iter: int, seq_len: int) -> np.ndarray:
    """``floor(L * cos(pi/2 * (s+1)/num_iter))`` for every step, in float64 as the reference."""
    ratio = np.cos(np.pi / 2.0 * (np.arange(num_iter) + 1) / num_iter)
    return np.floor(seq_len * ratio).astype(np.int32)


def next_mask_len(step: jax.Array, num_iter: int, seq_len: int, remaining: jax.Array) -> jax.Array:
    """Tokens still masked after ``step``: the cosine schedule clamped to ``[1, remaining-1]``."""
    target = jnp.asarray(mask_len_schedule(num_iter, seq_len))[step]
    return jnp.maximum(1, jnp.minimum(jnp.asarray(remaining, jnp.int32) - 1, target)).astype(jnp.int32)


def training_mask(rng: jax.Array, batch: int, seq_len: int, min_ratio: float,
                  mask_len: jax.Array | int | None = None, std: float = MASK_RATIO_STD,
                  per_example: bool = False, dist: str = "truncnorm", full_prob: float = 0.0):
    """One training mask: random orders, a mask ratio for the batch (MAR, Harmon) or one per
    example (``per_example``), drawn from ``dist`` (or a given ``mask_len``), and the visible
    tokens gathered into the static ``K`` of training. ``full_prob``: the chance that a ratio
    is 1 instead (everything masked: the prompt alone conditions the tokens).

    Returns ``(mask bool [B, L], idx [B, K], valid [B, K], ratio)`` (``ratio`` ``[B]`` per
    example, else a scalar).
    """
    k_order, k_ratio = jax.random.split(rng)
    orders = random_orders(k_order, batch, seq_len)
    shape = (batch,) if per_example else ()
    ratio = sample_mask_ratio(k_ratio, min_ratio, std, shape, dist)
    if full_prob > 0:
        ratio = jnp.where(jax.random.bernoulli(jax.random.fold_in(k_ratio, 1), full_prob, shape), 1.0, ratio)
    mask = mask_by_order(num_masked(seq_len, ratio) if mask_len is None else mask_len, orders)
    idx, valid = gather_visible(mask, max_visible_for_training(seq_len, min_ratio))
    return mask, idx, valid, ratio
