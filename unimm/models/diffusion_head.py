"""MAR's per-token diffusion MLP (``SimpleMLPAdaLN`` in LTH14/mar ``models/diffloss.py``).

``cfg`` fields: ``width`` (model channels), ``depth`` (residual blocks), ``token_dim``
(the noised token's channels), ``cond_dim`` (the MAR decoder width). The output has
``2 * token_dim`` channels: epsilon, then the learned-range variance interpolation.
Attribute names ``mlp_0`` / ``adaLN_modulation_1`` stand for the torch ``nn.Sequential``
indices ``mlp.0`` / ``adaLN_modulation.1``.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.models.layers import bind, layer_norm, linear, normal, zeros

FREQ_DIM = 256  # sinusoidal timestep features
ADALN_TABLE_BYTES = 256 << 20  # conditioned(timesteps=...): the most its table of adaLN outputs takes


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
    """``[N] -> [N, dim]`` sinusoidal features, ``[cos, sin]`` order (GLIDE / DiT)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype=None):
        init = normal(0.02)  # the reference re-draws these two after its xavier pass
        self.mlp_0 = linear(FREQ_DIM, width, (None, "mlp"), rngs=rngs, kernel_init=init, dtype=dtype)
        self.mlp_2 = linear(width, width, ("mlp", "embed"), rngs=rngs, kernel_init=init, dtype=dtype)

    def __call__(self, t):
        return self.mlp_2(jax.nn.silu(self.mlp_0(timestep_embedding(t))))


class ResBlock(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype=None):
        self.in_ln = layer_norm(width, rngs=rngs, eps=1e-6, dtype=dtype)
        self.mlp_0 = linear(width, width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.mlp_2 = linear(width, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
        # Zero-initialised adaLN: every block starts as the identity.
        self.adaLN_modulation_1 = linear(width, 3 * width, ("cond", "mlp"), rngs=rngs,
                                         kernel_init=zeros, dtype=dtype)

    def modulated(self, x, mod):
        """The block given its adaLN output ``mod = [shift, scale, gate]``."""
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = self.mlp_2(jax.nn.silu(self.mlp_0(modulate(self.in_ln(x), shift, scale))))
        return x + gate * h


class FinalLayer(nnx.Module):
    def __init__(self, width: int, out: int, *, rngs: nnx.Rngs, dtype=None):
        self.norm_final = layer_norm(width, rngs=rngs, eps=1e-6, affine=False, dtype=dtype)
        self.linear = linear(width, out, ("embed", "token"), rngs=rngs, kernel_init=zeros, dtype=dtype)
        self.adaLN_modulation_1 = linear(width, 2 * width, ("cond", "mlp"), rngs=rngs,
                                         kernel_init=zeros, dtype=dtype)

    def modulated(self, x, mod):
        shift, scale = jnp.split(mod, 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiffusionHead(nnx.Module):
    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        w = cfg.width
        dt = jnp.dtype(cfg.dtype)
        self.time_embed = TimestepEmbedder(w, rngs=rngs, dtype=dt)
        self.cond_embed = linear(cfg.cond_dim, w, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.input_proj = linear(cfg.token_dim, w, ("token", "mlp"), rngs=rngs, dtype=dt)
        self.res_blocks = nnx.List([ResBlock(w, rngs=rngs, dtype=dt) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(w, 2 * cfg.token_dim, rngs=rngs, dtype=dt)

    def __call__(self, x, t, c):
        y = jax.nn.silu(self.time_embed(t) + self.cond_embed(c))
        return self.modulated(x, [layer.adaLN_modulation_1(y) for layer in (*self.res_blocks, self.final_layer)])

    def modulated(self, x, mods):
        """The network given the adaLN outputs of every block and the final layer."""
        x = self.input_proj(x)
        for block, mod in zip(self.res_blocks, mods):
            x = block.modulated(x, mod)
        return self.final_layer.modulated(x, mods[-1])


def apply(params: Any, cfg: Any, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
    """``x [N, D]`` noised tokens, ``t [N]`` original-scale timesteps, ``c [N, C]`` -> ``[N, 2D]``."""
    return bind(DiffusionHead, cfg, params)(x, t, c).astype(jnp.float32)


def conditioned(params: Any, cfg: Any, c: jax.Array, *, tile: int = 1, time_table: int = 0,
                joined: bool = True, timesteps: np.ndarray | None = None):
    """The head with its condition ``c [N, C]`` fixed, for a sampler's many steps and for the
    training loss: ``fn(x [tile * N, D], t [] or [tile * N]) -> [tile * N, 2D]``, :func:`apply`
    of ``jnp.tile(c, (tile, 1))`` to float rounding. What does not change from step to step is
    done once, outside the steps' loop: the condition's embedding (once per row of ``c``, then
    tiled), and the adaLN kernels of every block and the final layer joined into one matmul
    (they all read the same ``silu(y)``). A scalar ``t`` (one timestep for every row, as in
    sampling) is embedded once. ``time_table`` > 0 (training: integer timesteps in
    ``[0, time_table)``, many rows each): the timesteps are embedded once each and looked up,
    when there are more rows than timesteps. ``joined=False`` keeps the adaLN matmuls apart
    (for thousands of rows, as in training, the joined output no longer fits the caches: the
    one wide matmul ran at half the speed of the separate ones on a 2-core CPU).

    ``timesteps`` (a sampler's whole schedule, static): the adaLN outputs of every step are
    computed up front in one matmul over all steps' rows (at a sampler's few dozen rows a
    matmul per step runs well below the machine's peak), when they take at most
    ``ADALN_TABLE_BYTES``; a scalar ``t`` then looks its step up."""
    head = bind(DiffusionHead, cfg, params)
    c_emb = head.cond_embed(c)
    if tile > 1:
        c_emb = jnp.tile(c_emb, (tile, 1))
    dt = jnp.dtype(cfg.dtype)
    if joined:
        ada = [params["res_blocks"][i]["adaLN_modulation_1"] for i in range(len(head.res_blocks))]
        ada.append(params["final_layer"]["adaLN_modulation_1"])
        kernel = jnp.concatenate([a["kernel"] for a in ada], axis=1).astype(dt)
        bias = jnp.concatenate([a["bias"] for a in ada]).astype(dt)
        cuts = list(itertools.accumulate(a["bias"].shape[0] for a in ada[:-1]))

    def embed_time(t):
        t = jnp.reshape(t, (-1,))
        if 0 < time_table < t.shape[0]:
            return jnp.take(head.time_embed(jnp.arange(time_table)), t, axis=0)
        return head.time_embed(t)

    table = None
    if joined and timesteps is not None and \
            len(timesteps) * c_emb.shape[0] * kernel.shape[1] * dt.itemsize <= ADALN_TABLE_BYTES:
        y = jax.nn.silu(head.time_embed(jnp.asarray(timesteps))[:, None, :] + c_emb[None])
        table = jnp.dot(y.astype(dt), kernel) + bias                       # [S, N, sum of widths]

    def adaln(t):
        if table is not None and jnp.ndim(t) == 0:
            return jnp.split(table[jnp.argmax(jnp.asarray(timesteps) == t)], cuts, axis=-1)
        y = jax.nn.silu(embed_time(t) + c_emb)
        if joined:
            return jnp.split(jnp.dot(y.astype(dt), kernel) + bias, cuts, axis=-1)
        return [layer.adaLN_modulation_1(y) for layer in (*head.res_blocks, head.final_layer)]

    def fn(x, t):
        return head.modulated(x, adaln(t)).astype(jnp.float32)
    return fn
