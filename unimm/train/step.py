"""The supervised train step: image->text cross-entropy + text->image diffusion loss
(+ RecA's reconstruction diffusion loss, + the planning cross-entropy).

``train_step(state, batch, rng, *, config) -> (state, metrics)`` is pure; bind the config
with :func:`make_train_step` and jit it with :func:`jit_train_step` (shardings + donation).

Batch keys (either task may be absent; images float32 in [-1, 1], NHWC):
``i2t_images [B1,H,W,3]``, ``i2t_tokens [B1,T1]`` (chat sequence with one run of
``<image>`` placeholders), ``i2t_targets [B1,T1]`` (next token, -1 = no loss),
``i2t_mask [B1,T1]`` (1 = real token); ``t2i_images [B2,H,W,3]``, ``t2i_tokens [B2,T2]``
(the prompt, already dropped to the unconditional prompt for ~10 %), ``t2i_mask [B2,T2]``.
``recon_images [B3,H,W,3]``, ``recon_tokens [B3,T3]`` (the understanding prompt of RecA's
instruction, one run of ``<image>`` placeholders), ``recon_mask [B3,T3]``.
``plan_tokens``, ``plan_targets``, ``plan_mask [B4,T4]``: text-only planning sequences
(a generation prompt -> its scene's description; targets as i2t's).
``{i2t,t2i,recon}_latents [B, L, D]`` may replace the images (pre-computed tokens).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unimm import sharding
from unimm.models import gaussian_diffusion, harmon, layers, mar, qwen2
from unimm.models import vae as vae_lib
from unimm.train.state import TrainState


def image_tokens(state_or_params: Any, model_cfg: Any, images: jax.Array) -> jax.Array:
    """Frozen tokenizer (VAE posterior mode x scale, or pixel patches): no gradient."""
    return jax.lax.stop_gradient(vae_lib.images_to_tokens(state_or_params, model_cfg.vae, images))


def batch_image_tokens(tokenizer_params: Any, model_cfg: Any, batch: dict, task: str) -> jax.Array:
    """A task's image tokens: ``{task}_latents [B, L, D]`` when the batch carries pre-computed
    tokens (MAR-style cached latents), else the frozen tokenizer applied to ``{task}_images``."""
    if f"{task}_latents" in batch:
        return jax.lax.stop_gradient(batch[f"{task}_latents"])
    return image_tokens(tokenizer_params, model_cfg, batch[f"{task}_images"])


def i2t_loss(params: Any, model_cfg: Any, batch: dict, img_tokens: jax.Array, image_id: int,
             grad_scale: float, rng: jax.Array | None = None, start: int = 0) -> tuple[jax.Array, dict]:
    """``rng``: MAR dropout (``model.mar.dropout``) in the understanding path. ``start``: no
    target lies before this position (``data.i2t_loss_start``: the chat head and the image
    slots), so only the positions after it are projected onto the vocabulary; at 512 px the
    1088 image slots are most of the sequence."""
    tokens = batch["i2t_tokens"]
    embeds = harmon.understanding_embeds(params, model_cfg, tokens, img_tokens, image_id, grad_scale,
                                         dropout_rng=rng)
    loss, acc = lm_loss(params, model_cfg, embeds, batch["i2t_mask"], batch["i2t_targets"], start)
    return loss, {"i2t_loss": loss, "i2t_token_acc": acc}


def plan_loss(params: Any, model_cfg: Any, batch: dict) -> tuple[jax.Array, dict]:
    """Planning (text only): the description's cross-entropy after the planning prompt."""
    embeds = qwen2.embed(params["llm"], model_cfg.llm, batch["plan_tokens"])
    loss, acc = lm_loss(params, model_cfg, embeds, batch["plan_mask"], batch["plan_targets"])
    return loss, {"plan_loss": loss, "plan_token_acc": acc}


def lm_loss(params: Any, model_cfg: Any, embeds: jax.Array, mask: jax.Array, targets: jax.Array,
            start: int = 0) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy and accuracy over the targets >= 0 (positions from
    ``start`` on only are projected onto the vocabulary)."""
    mask = mask.astype(bool)
    hidden, _ = qwen2.forward(params["llm"], model_cfg.llm, embeds, qwen2.positions_from_mask(mask), mask)
    logits = qwen2.lm_logits(params["llm"], model_cfg.llm, hidden[:, start:])
    targets = targets[:, start:]
    valid = targets >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    n = jnp.maximum(valid.sum(), 1)
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) & valid) / n
    return jnp.sum(ce * valid) / n, acc


def t2i_loss(params: Any, model_cfg: Any, batch: dict, img_tokens: jax.Array,
             rng: jax.Array) -> tuple[jax.Array, dict]:
    text = qwen2.embed(params["llm"], model_cfg.llm, batch["t2i_tokens"])
    return masked_diffusion_loss(params, model_cfg, text, batch["t2i_mask"], img_tokens, rng)


def recon_loss(params: Any, model_cfg: Any, batch: dict, img_tokens: jax.Array, image_id: int,
               grad_scale: float, rng: jax.Array) -> tuple[jax.Array, dict]:
    """RecA: the generation loss of an image whose prompt carries that image's understanding
    embeddings (the unmasked MAR encoder through ``proj_in``, gradient scaled by
    ``grad_scale``, MAR dropout on), as the understanding path feeds the LLM."""
    k_enc, k_gen = jax.random.split(rng)
    text = harmon.understanding_embeds(params, model_cfg, batch["recon_tokens"], img_tokens, image_id,
                                       grad_scale, dropout_rng=k_enc)
    loss, metrics = masked_diffusion_loss(params, model_cfg, text, batch["recon_mask"], img_tokens, k_gen)
    return loss, {f"recon_{k.removeprefix('t2i_')}": v for k, v in metrics.items()}


def masked_diffusion_loss(params: Any, model_cfg: Any, text: jax.Array, text_mask: jax.Array,
                          img_tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict]:
    """MAR's loss of ``img_tokens`` after the prompt embeddings ``text`` (generation and
    reconstruction): training masks, the decoder condition, the diffusion head's loss."""
    b, seq, dim = img_tokens.shape
    k_mask, k_diff = jax.random.split(rng)
    k_drop = jax.random.fold_in(rng, 2)
    m = model_cfg.mar
    mask, idx, valid, ratio = mar.training_mask(
        k_mask, b, seq, m.mask_ratio_min, std=m.mask_ratio_std,
        per_example=m.mask_ratio_per_example, dist=m.mask_ratio_dist,
        full_prob=m.mask_full_prob)
    z = harmon.decoder_condition(params, model_cfg, text, text_mask, img_tokens, idx, valid,
                                 dropout_rng=k_drop)
    weights = mar.loss_weights(mask, m.loss_weighting)
    # With late_loss_weight λ: mean + λ late mean.
    head_weights, head_scale = mar.late_loss_weights(mask, weights, m.late_mask_ratio, m.late_loss_weight)
    loss = gaussian_diffusion.diffusion_loss(
        params["head"], harmon.head_config(model_cfg), model_cfg.diffusion,
        harmon.head_target(params, model_cfg, z, img_tokens).reshape(-1, dim), z.reshape(b * seq, -1),
        head_weights.reshape(-1), k_diff,
        row_sizes=mar.loss_row_sizes(seq, m.mask_ratio_min, model_cfg.diffusion.loss_row_buckets)) * head_scale
    metrics = {"t2i_loss": loss, "mask_ratio": jnp.mean(ratio)}
    if harmon.has_readout(model_cfg):
        aux = harmon.readout_loss(params, z, img_tokens, weights)
        loss, metrics = loss + model_cfg.readout_weight * aux, {**metrics, "t2i_readout_loss": aux}
    return loss, metrics


def loss_fn(params: Any, tokenizer_params: Any, batch: dict, rng: jax.Array, *, config: Any):
    m, t = config.model, config.train
    total, metrics = 0.0, {}
    if "i2t_tokens" in batch:
        toks = batch_image_tokens(tokenizer_params, m, batch, "i2t")
        loss, mets = i2t_loss(params, m, batch, toks, config.data.image_token_id, m.understanding_grad_scale,
                              jax.random.fold_in(rng, 1), config.data.i2t_loss_start)
        total, metrics = total + t.i2t_weight * loss, {**metrics, **mets}
    if "t2i_tokens" in batch:
        toks = batch_image_tokens(tokenizer_params, m, batch, "t2i")
        loss, mets = t2i_loss(params, m, batch, toks, rng)
        total, metrics = total + t.t2i_weight * loss, {**metrics, **mets}
    if "recon_tokens" in batch:
        toks = batch_image_tokens(tokenizer_params, m, batch, "recon")
        loss, mets = recon_loss(params, m, batch, toks, config.data.image_token_id, m.understanding_grad_scale,
                                jax.random.fold_in(rng, 3))
        total, metrics = total + t.recon_weight * loss, {**metrics, **mets}
    if "plan_tokens" in batch:
        loss, mets = plan_loss(params, m, batch)
        total, metrics = total + t.plan_weight * loss, {**metrics, **mets}
    return total, metrics


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, config: Any) -> tuple[TrainState, dict]:
    """One optimizer step; the step's randomness is ``fold_in(rng, step)`` (resumable)."""
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, config=config), has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, state.tokenizer_params, batch, rng)
    state, skipped = apply_gradients(state, grads, config.train.ema_decay, loss)
    return state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "nonfinite": skipped}


def apply_gradients(state: TrainState, grads: Any, ema_decay: float,
                    loss: jax.Array | None = None) -> tuple[TrainState, jax.Array]:
    """The optimizer update, the EMA of the params and the step count (shared with GRPO).

    A step whose loss or gradient is not finite changes nothing but the step count (params,
    optimizer state and EMA are kept): returns ``(state, skipped)`` with ``skipped`` 1.0 then.
    """
    finite = jnp.isfinite(optax.tree.norm(grads))
    if loss is not None:
        finite &= jnp.isfinite(loss)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return state.replace(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         ema_params=keep(ema, state.ema_params)), 1.0 - finite.astype(jnp.float32)


def make_train_step(config: Any):
    """``train_step`` with the config bound: ``step(state, batch, rng) -> (state, metrics)``."""
    config = layers.freeze(config)
    return functools.partial(train_step, config=config)


def jit_train_step(config: Any, mesh: jax.sharding.Mesh, state_sharding: Any, batch_example: dict):
    """The jitted step: state sharded as given (and donated), batch split over data axes."""
    batch_sharding = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch_example.items()}
    return jax.jit(make_train_step(config),
                   in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=(0,))
