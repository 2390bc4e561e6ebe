"""Harmon: one MAR encoder shared by understanding and generation, a Qwen2 LM, a diffusion head.

The params pytree is ``{"llm", "mar", "head", "proj_in", "proj_out"}`` (plus ``"readout"``
when ``model.readout_weight > 0``); each sub-tree is exactly what its component's pure
functions take. The VAE (or pixel-patch tokenizer) is
frozen and kept outside this tree (it is not in the official checkpoint either).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unimm.models import layers, mar, qwen2
from unimm.models import vae as vae_lib
from unimm.models.diffusion_head import DiffusionHead
from unimm.models.mar import MAR
from unimm.models.qwen2 import Qwen2


def head_config(model_cfg: Any) -> ml_collections.ConfigDict:
    """The diffusion head's config: the diffusion fields + token and condition widths."""
    c = ml_collections.ConfigDict(dict(model_cfg.diffusion))
    c.token_dim = model_cfg.mar.token_dim
    c.cond_dim = model_cfg.mar.decoder_width
    return c


def validate(model_cfg: Any) -> None:
    """Cross-component consistency; raises one clear error naming the fields."""
    m, llm = model_cfg.mar, model_cfg.llm
    if model_cfg.vae.get("code_dim", 0) and model_cfg.vae.kind != "patch":
        raise ValueError(f"model.vae.code_dim={model_cfg.vae.code_dim} applies to the 'patch' tokenizer, "
                         f"not {model_cfg.vae.kind!r} (set it to 0)")
    tok = vae_lib.token_dim(model_cfg.vae)
    if m.token_dim != tok:
        raise ValueError(f"model.mar.token_dim={m.token_dim} but model.vae ({model_cfg.vae.kind}) "
                         f"produces {tok}-dim tokens")
    grid = tuple(vae_lib.grid(model_cfg.vae, model_cfg.image_size))
    if grid != (m.grid, m.grid):
        raise ValueError(f"model.image_size={model_cfg.image_size} gives a {grid[0]}x{grid[1]} token grid, "
                         f"but model.mar.grid={m.grid}")
    if llm.num_heads % llm.num_kv_heads:
        raise ValueError(f"model.llm.num_heads={llm.num_heads} is not a multiple of "
                         f"model.llm.num_kv_heads={llm.num_kv_heads}")
    for name, width, heads in (("width", m.width, m.num_heads), ("decoder_width", m.decoder_width, m.num_heads)):
        if width % heads:
            raise ValueError(f"model.mar.{name}={width} is not divisible by model.mar.num_heads={heads}")
    std = m.mask_ratio_std
    if not (0.0 <= m.mask_ratio_min < 1.0 and std > 0):
        raise ValueError(f"model.mar.mask_ratio_min={m.mask_ratio_min} must lie in [0, 1) and "
                         f"model.mar.mask_ratio_std={std} be > 0")
    if m.mask_ratio_dist not in mar.MASK_RATIO_DISTS:
        raise ValueError(f"model.mar.mask_ratio_dist={m.mask_ratio_dist!r}: expected one of {mar.MASK_RATIO_DISTS}")
    if m.loss_weighting not in mar.LOSS_WEIGHTINGS:
        raise ValueError(f"model.mar.loss_weighting={m.loss_weighting!r}: expected one of {mar.LOSS_WEIGHTINGS}")
    if m.late_loss_weight < 0 or not 0.0 < m.late_mask_ratio <= 1.0:
        raise ValueError(f"model.mar.late_loss_weight={m.late_loss_weight} must be >= 0 and "
                         f"model.mar.late_mask_ratio={m.late_mask_ratio} in (0, 1]")
    if model_cfg.diffusion.loss_row_buckets < 1:
        raise ValueError(f"model.diffusion.loss_row_buckets={model_cfg.diffusion.loss_row_buckets} must be >= 1 "
                         "(1 = the head on every token)")
    if not 0.0 <= m.mask_full_prob <= 1.0:
        raise ValueError(f"model.mar.mask_full_prob={m.mask_full_prob} must lie in [0, 1]")
    if model_cfg.readout_residual and not has_readout(model_cfg):
        raise ValueError(f"model.readout_residual=True needs the readout: model.readout_weight > 0 "
                         f"(got {model_cfg.readout_weight})")


def projector_config(din: int, dhidden: int, dout: int, axes_in: str, axes_out: str):
    return ml_collections.FrozenConfigDict(
        dict(din=din, dhidden=dhidden, dout=dout, axes_in=axes_in, axes_out=axes_out))


class Projector(nnx.Module):
    """Linear(din->dhidden) -> SiLU -> Linear(dhidden->dout) (Harmon's ``build_mlp``)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.fc1 = layers.linear(cfg.din, cfg.dhidden, (cfg.axes_in, "mlp"), rngs=rngs)
        self.fc2 = layers.linear(cfg.dhidden, cfg.dout, ("mlp", cfg.axes_out), rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.silu(self.fc1(x)))


def proj_in_config(cfg) -> ml_collections.FrozenConfigDict:
    h = cfg.llm.hidden_size
    return projector_config(cfg.mar.width, h, h, "cond", "embed")


def proj_out_config(cfg) -> ml_collections.FrozenConfigDict:
    h = cfg.llm.hidden_size
    return projector_config(h, h, cfg.mar.width, "embed", "cond")


class Harmon(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.llm = Qwen2(cfg.llm, rngs=rngs)
        self.mar = MAR(cfg.mar, rngs=rngs)
        self.head = DiffusionHead(layers.freeze(head_config(cfg)), rngs=rngs)
        self.proj_in = Projector(proj_in_config(cfg), rngs=rngs)      # MAR width -> LLM hidden
        self.proj_out = Projector(proj_out_config(cfg), rngs=rngs)    # LLM hidden -> MAR width
        if has_readout(cfg):   # training aid, not in Harmon's checkpoints (see readout_loss)
            self.readout = layers.linear(cfg.mar.decoder_width, cfg.mar.token_dim, ("embed", "token"), rngs=rngs)


TRAINING_AIDS = ("readout",)   # param groups of ours that Harmon's checkpoints lack


def has_readout(cfg: Any) -> bool:
    return cfg.readout_weight > 0


def init_readout(cfg: Any, rng: jax.Array) -> dict:
    """Fresh ``readout`` params (as :class:`Harmon` initialises them), for converted weights."""
    shape = (cfg.mar.decoder_width, cfg.mar.token_dim)
    return {"kernel": layers.xavier_uniform(rng, shape), "bias": jnp.zeros(shape[1:])}


def readout(params: dict, z: jax.Array) -> jax.Array:
    """The linear readout ``z -> token`` (the regression the readout loss trains)."""
    r = params["readout"]
    return z @ r["kernel"].astype(z.dtype) + r["bias"].astype(z.dtype)


def diffuses_residual(cfg: Any) -> bool:
    """``model.readout_residual``: the head models ``token - readout(z)`` instead of the token.

    The readout regresses the conditional mean of a token from ``z``; the head then only
    has to model what is left around it. (On tiny that mean alone rebuilds 0.75-0.84 of
    held-out scenes from their captions, the head's samples 0.32; but the head sampling
    the residual did not do better: results/generation.md.)"""
    return bool(cfg.readout_residual)


def head_target(params: dict, cfg: Any, z: jax.Array, tokens: jax.Array) -> jax.Array:
    """What the diffusion head is trained to produce for ``tokens`` given ``z``: the tokens,
    or (``readout_residual``) their residual from the readout, which the readout's own loss
    trains (no gradient through this path)."""
    if not diffuses_residual(cfg):
        return tokens
    return tokens - jax.lax.stop_gradient(readout(params, z)).astype(tokens.dtype)


def head_offset(params: dict, cfg: Any, z_rows: jax.Array, guided: bool, scale) -> jax.Array | float:
    """What samples add to the head's output: 0, or (``readout_residual``) ``readout(z)``,
    guided like the head's ε when ``guided`` (rows ``[cond; uncond]``: ``u + scale (c - u)``)."""
    if not diffuses_residual(cfg):
        return 0.0
    r = readout(params, z_rows).astype(jnp.float32)
    if not guided:
        return r
    cond, uncond = jnp.split(r, 2)
    return uncond + scale * (cond - uncond)


def readout_loss(params: dict, z: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error of a linear readout ``z -> token`` over the masked tokens (``mask``:
    1 on them, or per-token weights).

    The diffusion head reads ``z`` only through zero-initialised adaLN gates, so at the
    start the decoder and the LLM get no gradient that says what ``z`` should hold, and
    the head has nothing in ``z`` worth learning to read: neither side moves. This direct
    regression target breaks that stall (``model.readout_weight``; sampling uses it only with
    ``model.readout_residual``).
    """
    pred = readout(params, z)
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - tokens.astype(jnp.float32)), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(err * mask) / jnp.maximum(mask.sum(), 1.0)


def init(cfg: Any, rng: jax.Array) -> dict:
    validate(cfg)
    return layers.init_params(Harmon, cfg, rng)


def abstract_params(cfg: Any) -> dict:
    validate(cfg)
    return layers.abstract_params(Harmon, cfg)


def logical_specs(cfg: Any) -> dict:
    return layers.logical_specs(Harmon, cfg)


def project_in(params: dict, cfg: Any, x: jax.Array) -> jax.Array:
    return layers.bind(Projector, proj_in_config(cfg), params["proj_in"])(x)


def project_out(params: dict, cfg: Any, x: jax.Array) -> jax.Array:
    return layers.bind(Projector, proj_out_config(cfg), params["proj_out"])(x)


def buffer_to_end(x: jax.Array, buffer: int) -> jax.Array:
    return jnp.concatenate([x[:, buffer:], x[:, :buffer]], axis=1)


def buffer_to_start(x: jax.Array, buffer: int) -> jax.Array:
    return jnp.concatenate([x[:, -buffer:], x[:, :-buffer]], axis=1)


def visual_features(params: dict, cfg: Any, image_tokens: jax.Array, idx: jax.Array, valid: jax.Array,
                    dropout_rng: jax.Array | None = None):
    """MAR encoder over the visible tokens -> (x_enc [B, buf+K, C], LLM embeddings [B, K+buf, H]).

    Inside the LLM the buffer tokens move to the *end* of the image segment (Harmon). A
    token count other than ``grid**2`` (a larger image) interpolates the position embeddings.
    ``dropout_rng`` (training) turns on the MAR blocks' dropout (``cfg.mar.dropout``).
    """
    x_enc = mar.encode(params["mar"], cfg.mar, image_tokens, idx, valid,
                       grid=mar.grid_for(cfg.mar, image_tokens.shape[1]), dropout_rng=dropout_rng)
    z_enc = buffer_to_end(project_in(params, cfg, x_enc), cfg.mar.buffer_size)
    return x_enc, z_enc


def image_kv_mask(valid: jax.Array, buffer: int) -> jax.Array:
    """Key mask of the image segment as the LLM sees it: visible slots, then the buffers."""
    return jnp.concatenate([valid, jnp.ones((valid.shape[0], buffer), bool)], axis=1)


def decoder_condition(params: dict, cfg: Any, text_embeds: jax.Array, text_mask: jax.Array,
                      image_tokens: jax.Array, idx: jax.Array, valid: jax.Array,
                      dropout_rng: jax.Array | None = None) -> jax.Array:
    """Text + visible image tokens -> the per-token condition ``z`` [B, L, Cd] for the head.

    ``text_mask`` marks real text tokens (left or right padding both work); positions are
    ``cumsum(mask) - 1`` over text and image, as in Harmon's ``prepare_forward_input``.
    ``dropout_rng`` (training): MAR dropout in the encoder and the decoder.
    """
    buf = cfg.mar.buffer_size
    k_enc, k_dec = jax.random.split(dropout_rng) if dropout_rng is not None else (None, None)
    x_enc, z_enc = visual_features(params, cfg, image_tokens, idx, valid, k_enc)
    kv_mask = jnp.concatenate([text_mask.astype(bool), image_kv_mask(valid, buf)], axis=1)
    positions = jnp.maximum(jnp.cumsum(kv_mask, axis=1) - 1, 0)
    embeds = jnp.concatenate([text_embeds, z_enc.astype(text_embeds.dtype)], axis=1)
    hidden, _ = qwen2.forward(params["llm"], cfg.llm, embeds, positions, kv_mask)
    z_llm = buffer_to_start(hidden[:, -z_enc.shape[1]:], buf)
    x_enc = x_enc + project_out(params, cfg, z_llm)      # residual: MAR features + LLM refinement
    return mar.decode(params["mar"], cfg.mar, x_enc, idx, valid,
                      grid=mar.grid_for(cfg.mar, image_tokens.shape[1]), dropout_rng=k_dec)


def scale_grad(x: jax.Array, scale: float) -> jax.Array:
    """Identity forward; the gradient flowing back through ``x`` is multiplied by ``scale``."""
    return scale * x + jax.lax.stop_gradient((1.0 - scale) * x)


def full_visibility(batch: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """``(idx, valid)`` for an encoder pass with nothing masked (understanding)."""
    idx = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    return idx, jnp.ones((batch, seq_len), bool)


def understanding_embeds(params: dict, cfg: Any, tokens: jax.Array, image_tokens: jax.Array,
                         image_id: int, grad_scale: float = 1.0,
                         dropout_rng: jax.Array | None = None) -> jax.Array:
    """Text embeddings with the ``<image>`` placeholders replaced by image embeddings.

    ``tokens [B, T]`` hold one run of ``grid**2 + buffer`` ``image_id`` placeholders per row;
    the k-th placeholder takes the k-th image embedding (buffers last, as in Harmon).
    ``grad_scale`` scales the gradient into the MAR encoder and ``proj_in`` (0.1 in training);
    ``dropout_rng`` (training) turns on the MAR encoder's dropout.
    """
    b, seq = image_tokens.shape[:2]
    _, z_img = visual_features(params, cfg, image_tokens, *full_visibility(b, seq), dropout_rng)
    z_img = scale_grad(z_img, grad_scale) if grad_scale != 1.0 else z_img
    text = qwen2.embed(params["llm"], cfg.llm, tokens)
    is_image = tokens == image_id
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, z_img.shape[1] - 1)
    picked = jnp.take_along_axis(z_img, slot[..., None], axis=1).astype(text.dtype)
    return jnp.where(is_image[..., None], picked, text)
