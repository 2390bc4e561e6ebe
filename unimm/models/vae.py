"""Image tokenizers: the KL-16 VAE (LDM ``AutoencoderKL`` as used by MAR/Harmon) and pixel patches.

Modules work in NHWC; attribute names mirror the PyTorch reference (``encoder.down.{i}.
block.{j}.conv1`` ...) so the checkpoint mapping (``unimm.convert.vae_ckpt``) is a
mechanical walk over the params tree. Public compute is pure functions of the params.
Both tokenizer kinds share one interface chosen by ``cfg.kind``: ``"kl16"`` or ``"patch"``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.models.layers import bind, freeze, init_params, ones, zeros

KINDS = ("kl16", "patch")
_CONV_AXES = ("kernel_h", "kernel_w", "conv_in", "conv_out")


def _conv(cin: int, cout: int, k: int, *, rngs: nnx.Rngs, stride: int = 1, padding: Any = None) -> nnx.Conv:
    # Explicit padding (PyTorch's symmetric k//2 unless told otherwise), never "SAME":
    # SAME pads asymmetrically for stride 2, which would silently differ from the reference.
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=k // 2 if padding is None else padding,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), _CONV_AXES),
                    bias_init=nnx.with_partitioning(zeros, ("conv_out",)), rngs=rngs)


def _norm(c: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance as torch.group_norm computes it (the fast E[x^2]-E[x]^2 loses digits).
    return nnx.GroupNorm(c, num_groups=32, epsilon=1e-6, use_fast_variance=False,
                         scale_init=nnx.with_partitioning(ones, ("norm",)),
                         bias_init=nnx.with_partitioning(zeros, ("norm",)), rngs=rngs)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.norm1, self.conv1 = _norm(cin, rngs=rngs), _conv(cin, cout, 3, rngs=rngs)
        self.norm2, self.conv2 = _norm(cout, rngs=rngs), _conv(cout, cout, 3, rngs=rngs)
        self.nin_shortcut = _conv(cin, cout, 1, rngs=rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))  # dropout is 0 in the reference
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, 1x1 convs for q/k/v/proj_out."""

    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.norm = _norm(c, rngs=rngs)
        self.q, self.k, self.v, self.proj_out = (_conv(c, c, 1, rngs=rngs) for _ in range(4))

    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(b, hh * ww, 1, c) for f in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k, v)  # scale c**-0.5, as the reference
        return x + self.proj_out(out.reshape(b, hh, ww, c))


class Downsample(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        # The reference pads (0,1,0,1) -- bottom/right only -- then a valid stride-2 conv.
        self.conv = _conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, rngs=rngs)

    def __call__(self, x):
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))  # nearest x2


class _Level(nnx.Module):
    """One resolution: ``block`` and ``attn`` (maybe empty) lists; the owner adds the resampler."""

    def __init__(self, blocks, attns=()):
        self.block, self.attn = nnx.List(blocks), nnx.List(list(attns))


class _Mid(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.block_1, self.attn_1, self.block_2 = (
            ResnetBlock(c, c, rngs=rngs), AttnBlock(c, rngs=rngs), ResnetBlock(c, c, rngs=rngs))

    def __call__(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        ch, mult, n = cfg.ch, tuple(cfg.ch_mult), len(cfg.ch_mult)
        self.conv_in = _conv(3, ch, 3, rngs=rngs)
        levels, res, cin = [], cfg.resolution, ch
        for i in range(n):
            cout, blocks, attns = ch * mult[i], [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, rngs=rngs))
                cin = cout
                if res in cfg.attn_resolutions:  # resolution tracked from cfg.resolution, as the reference
                    attns.append(AttnBlock(cin, rngs=rngs))
            levels.append(_Level(blocks, attns))
            if i < n - 1:  # the deepest level keeps its resolution
                levels[-1].downsample = Downsample(cin, rngs=rngs)
                res //= 2
        self.down = nnx.List(levels)
        self.mid = _Mid(cin, rngs=rngs)
        self.norm_out = _norm(cin, rngs=rngs)
        self.conv_out = _conv(cin, 2 * cfg.embed_dim, 3, rngs=rngs)  # double_z: mean and logvar

    def __call__(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(nnx.silu(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        ch, mult, n = cfg.ch, tuple(cfg.ch_mult), len(cfg.ch_mult)
        cin = ch * mult[-1]
        self.conv_in = _conv(cfg.embed_dim, cin, 3, rngs=rngs)
        self.mid = _Mid(cin, rngs=rngs)
        levels = {}
        for i in reversed(range(n)):  # built deepest first so channels chain; stored by level index
            cout, blocks = ch * mult[i], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, rngs=rngs))
                cin = cout
            levels[i] = _Level(blocks)
            if i:  # level 0 is already at full resolution
                levels[i].upsample = Upsample(cin, rngs=rngs)
        self.up = nnx.List([levels[i] for i in range(n)])
        self.norm_out = _norm(cin, rngs=rngs)
        self.conv_out = _conv(cin, 3, 3, rngs=rngs)

    def __call__(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(nnx.silu(self.norm_out(h)))


class KLVAE(nnx.Module):
    """LDM ``AutoencoderKL`` (MAR ``models/vae.py``) in NHWC."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        e = cfg.embed_dim
        self.encoder, self.decoder = Encoder(cfg, rngs=rngs), Decoder(cfg, rngs=rngs)
        self.quant_conv = _conv(2 * e, 2 * e, 1, rngs=rngs)
        self.post_quant_conv = _conv(e, e, 1, rngs=rngs)

    def encode(self, x):
        mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # DiagonalGaussianDistribution's clamp

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


# ----------------------------------------------------------------------------- pure API


def encode(params, cfg, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images ``[B,H,W,3]`` in [-1, 1] -> posterior ``(mean, logvar)``, each ``[B,H/s,W/s,e]``."""
    _check_images(images, stride(cfg))
    return bind(KLVAE, cfg, params).encode(images)


def decode(params, cfg, latents: jax.Array) -> jax.Array:
    """Unscaled latents ``[B,h,w,e]`` -> images ``[B,h*s,w*s,3]`` (roughly in [-1, 1])."""
    if latents.ndim != 4 or latents.shape[-1] != cfg.embed_dim:
        raise ValueError(f"vae.decode: expected latents [B, h, w, {cfg.embed_dim}], got shape {latents.shape}")
    return bind(KLVAE, cfg, params).decode(latents)


def _kind(cfg) -> str:
    if cfg.kind not in KINDS:
        raise ValueError(f"vae config: unknown kind {cfg.kind!r}; choose one of {KINDS}")
    return cfg.kind


def stride(cfg) -> int:
    """Pixels per token side."""
    return 2 ** (len(cfg.ch_mult) - 1) if _kind(cfg) == "kl16" else cfg.patch_size


def token_dim(cfg) -> int:
    if _kind(cfg) == "kl16":
        return cfg.embed_dim
    return int(cfg.get("code_dim", 0)) or 3 * cfg.patch_size ** 2


def has_patch_code(cfg) -> bool:
    """The patch kind with ``code_dim > 0``: its params are fitted to data (:func:`fit_patch_code`)."""
    return _kind(cfg) == "patch" and int(cfg.get("code_dim", 0)) > 0


def _code_scale(cfg) -> float:
    # An orthonormal projection keeps a patch's norm over fewer channels; this keeps a
    # channel's spread at a pixel's on average, so the diffusion schedule meets the same signal.
    return math.sqrt(cfg.code_dim / (3 * cfg.patch_size ** 2))


def _check_code(params, cfg) -> None:
    if not isinstance(params, dict) or "basis" not in params or "mean" not in params:
        raise ValueError(f"model.vae.code_dim={cfg.code_dim}: the tokenizer params must hold the fitted patch "
                         f"code ('mean', 'basis'), got {type(params).__name__} "
                         f"{sorted(params) if isinstance(params, dict) else ''}; make them with "
                         "unimm.train.state.initial_tokenizer_params(config, rng) (or vae.fit_patch_code)")


def fit_patch_code(cfg, images: np.ndarray) -> dict:
    """``{"mean" [P], "basis" [code_dim, P]}``: the mean pixel patch of ``images`` ([N,H,W,3]
    in [-1, 1]) and its ``code_dim`` principal directions (PCA, float64)."""
    if not has_patch_code(cfg):
        raise ValueError(f"fit_patch_code needs model.vae.kind='patch' and code_dim > 0 (got {cfg.kind!r}, "
                         f"{cfg.get('code_dim', 0)})")
    p = cfg.patch_size
    n, hh, ww, _ = _check_images(images, p)
    patches = np.asarray(images, np.float64).reshape(n, hh // p, p, ww // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(-1, 3 * p * p)
    if cfg.code_dim > min(patches.shape):
        raise ValueError(f"model.vae.code_dim={cfg.code_dim} exceeds what {len(patches)} patches of "
                         f"{patches.shape[1]} pixels can fit")
    mean = patches.mean(0)
    basis = np.linalg.svd(patches - mean, full_matrices=False)[2][:cfg.code_dim]
    # The sign of a singular vector is arbitrary: fix it (largest entry positive) so that refits agree.
    basis *= np.sign(basis[np.arange(len(basis)), np.abs(basis).argmax(1)])[:, None]
    return {"mean": jnp.asarray(mean, jnp.float32), "basis": jnp.asarray(basis, jnp.float32)}


def grid(cfg, image_size) -> tuple[int, int]:
    """Token grid ``(h, w)`` for an ``image_size`` (int or ``(H, W)``)."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    s = stride(cfg)
    if any(d % s for d in hw):
        raise ValueError(f"image size {hw} is not divisible by the tokenizer stride {s}")
    return hw[0] // s, hw[1] // s


def init(cfg, rng: jax.Array) -> Any:
    """Fresh tokenizer params (``{}`` for the parameter-free patch kind; for a patch code,
    zeros of its shapes, to be replaced by :func:`fit_patch_code`)."""
    if _kind(cfg) == "kl16":
        return init_params(KLVAE, cfg, rng)
    if has_patch_code(cfg):
        pixels = 3 * cfg.patch_size ** 2
        return {"mean": jnp.zeros((pixels,), jnp.float32), "basis": jnp.zeros((cfg.code_dim, pixels), jnp.float32)}
    return {}


def images_to_tokens(params, cfg, images: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
    """Images ``[B,H,W,3]`` in [-1, 1] -> tokens ``[B, h*w, token_dim]`` in raster order.

    kl16: posterior mode (``rng=None``, what Harmon uses) or a posterior sample, times
    ``cfg.scale``. patch: each ``p x p`` pixel patch flattened in (row, col, rgb) order.
    """
    b, hh, ww, _ = _check_images(images, stride(cfg))
    if _kind(cfg) == "patch":
        p = cfg.patch_size
        x = images.reshape(b, hh // p, p, ww // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (hh // p) * (ww // p), 3 * p * p)
        if has_patch_code(cfg):
            _check_code(params, cfg)
            x = (x - params["mean"]) @ params["basis"].T * _code_scale(cfg)
        return x
    return _kl16_tokens(params, freeze(cfg), images, rng)


# The KL-16 halves compiled whole: called outside jit (sampling, captioning, GRPO rollouts),
# eagerly they would compile and dispatch each of their ~100 convolutions and norms one by
# one. Inside another jit they inline.
@functools.partial(jax.jit, static_argnums=1)
def _kl16_tokens(params, cfg, images, rng):
    mean, logvar = encode(params, cfg, images)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return (z * cfg.scale).reshape(images.shape[0], -1, cfg.embed_dim)


@functools.partial(jax.jit, static_argnums=1)
def _kl16_images(params, cfg, latents):
    return decode(params, cfg, latents / cfg.scale)


def tokens_to_images(params, cfg, tokens: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Inverse of :func:`images_to_tokens` (decoded, for kl16): ``[B, h*w, D]`` -> ``[B,H,W,3]``."""
    h, w = grid_hw
    d = token_dim(cfg)
    if tokens.ndim != 3 or tokens.shape[1:] != (h * w, d):
        raise ValueError(f"tokens_to_images: expected tokens [B, {h * w}, {d}] for grid {grid_hw}, "
                         f"got shape {tokens.shape}")
    b = tokens.shape[0]
    if _kind(cfg) == "patch":
        p = cfg.patch_size
        if has_patch_code(cfg):
            _check_code(params, cfg)
            tokens = tokens / _code_scale(cfg) @ params["basis"] + params["mean"]
        x = tokens.reshape(b, h, w, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * p, w * p, 3)
    return _kl16_images(params, freeze(cfg), tokens.reshape(b, h, w, d))


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8 pixels, ``clip(127.5 x + 128)`` as the reference."""
    return jnp.clip(127.5 * images + 128.0, 0, 255).astype(jnp.uint8)


def from_uint8(images: jax.Array) -> jax.Array:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _check_images(images, s: int) -> tuple[int, ...]:
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"expected float images in [-1, 1], got dtype {images.dtype} (use from_uint8)")
    if shape[1] % s or shape[2] % s:
        raise ValueError(f"image shape {shape}: H and W must be divisible by the tokenizer stride {s}")
    return shape
