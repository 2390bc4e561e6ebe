"""Unified-GRPO, understanding for generation: the policy is the decoder (MAR + diffusion head,
optionally the LLM); the frozen encoder writes the captions, the reward compares each sampled
image with its source.

Every MAR iteration draws its tokens with the Gaussian ancestral sampler, so an image's
probability factorises over (iteration, diffusion step, token) into Gaussians whose means
the policy computes. :func:`image_rollout` samples ``G`` images per caption with the
evaluation's sampler (``generate_image_tokens(record=True)``), which records each step
(``x_t``, ``x_{t-1}``, the CFG scale); :func:`step_log_probs` scores the steps, for the old
log-probs at rollout time and for the update alike, so the first ratio is 1.
:func:`decoder_grpo_loss` combines the PPO-clipped per-step ratio with the closed-form
Gaussian KL to the reference (Flow-GRPO). Rollout arrays are batch-leading (one row per
image) so ``grpo_step`` shards them over the data axes like the captioner's.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unimm.models import gaussian_diffusion, harmon, harmon_sample, mar, qwen2
from unimm.train import grpo_math
from unimm.train.state import TrainState
from unimm.train.step import apply_gradients, batch_image_tokens, t2i_loss


def _to_sampler(x: jax.Array) -> jax.Array:
    """Batch-leading ``[b, S, W, ...]`` -> sampler layout ``[S, b*W, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _window(z: jax.Array, pos: jax.Array, guided: bool) -> jax.Array:
    """The condition rows of the tokens an iteration draws: ``[cond; uncond]`` when guided."""
    pos = jnp.concatenate([pos, pos]) if guided else pos
    z_win = jnp.take_along_axis(z, pos[..., None], axis=1)
    return z_win.reshape(-1, z_win.shape[-1])


@functools.partial(jax.jit, static_argnums=(2,), static_argnames=(
    "num_iter", "guided", "cfg_schedule", "num_steps", "grid"))
def image_rollout(policy_params: dict, ref_params: dict, cfg: Any, tokens: jax.Array, mask: jax.Array,
                  uncond_tokens: jax.Array, uncond_mask: jax.Array, rng: jax.Array, *, num_iter: int,
                  guided: bool, cfg_scale=1.0, cfg_schedule: str = "constant", temperature=1.0,
                  num_steps: str | None = None, grid: int | None = None) -> dict:
    """One image per prompt row (repeat prompts ``G`` times for groups), with its trajectory.

    The images are :func:`harmon_sample.generate_image_tokens`'s own (``record=True``; the
    sampling options are the evaluation's). ``tokens / mask [b, T]`` are the (cond) prompts,
    ``uncond_*`` the unconditional prompt rows used for CFG when ``guided``. Returns
    batch-leading arrays: ``image_tokens [b, L, D]``, the recorded trajectory (``masked``,
    ``pos``, ``pos_valid``, ``scale``, ``t``, ``x``, ``x_next``), ``old_log_probs [b, I, S, W]``
    scored by :func:`step_log_probs` (what the update scores, so the first ratio is 1),
    ``ref_mean / ref_log_var [b, I, S, W, D]`` under ``ref_params``, and the prompts.
    """
    rows_tok = jnp.concatenate([tokens, uncond_tokens]) if guided else tokens
    rows_mask = jnp.concatenate([mask, uncond_mask]) if guided else mask
    img, trajectory = harmon_sample.generate_image_tokens(
        policy_params, cfg, rows_tok, rows_mask, rng, num_iter=num_iter, guided=guided, cfg_scale=cfg_scale,
        cfg_schedule=cfg_schedule, temperature=temperature, num_steps=num_steps, grid=grid, record=True)
    rollout = {**trajectory, "image_tokens": img, "tokens": tokens, "mask": mask,
               "uncond_tokens": uncond_tokens, "uncond_mask": uncond_mask}
    old_log_probs, _, _ = step_log_probs(policy_params, cfg, rollout, guided=guided, num_steps=num_steps,
                                         temperature=temperature)
    ref_mean, ref_log_var = step_means(ref_params, cfg, rollout, guided=guided, num_steps=num_steps)
    return {**rollout, "old_log_probs": old_log_probs, "ref_mean": ref_mean, "ref_log_var": ref_log_var}


def step_means(params: dict, cfg: Any, rollout: dict, *, guided: bool, num_steps) -> tuple:
    """``(mean, log_var) [b, I, S, W, D]`` of every recorded step under ``params``: each
    iteration's condition recomputed in one LLM pass over prompt + visible tokens, guided
    with the iteration's recorded CFG scale."""
    b, n_iter, seq = rollout["masked"].shape
    img = rollout["image_tokens"]
    rows_tok = jnp.concatenate([rollout["tokens"], rollout["uncond_tokens"]]) if guided else rollout["tokens"]
    rows_mask = jnp.concatenate([rollout["mask"], rollout["uncond_mask"]]) if guided else rollout["mask"]
    text = qwen2.embed(params["llm"], cfg.llm, rows_tok)
    both = (lambda x: jnp.concatenate([x, x])) if guided else (lambda x: x)
    head_cfg = harmon.head_config(cfg)
    w = rollout["pos"].shape[-1]

    def one_iteration(masked, pos, scale, traj):
        idx, valid = mar.gather_visible(both(masked), seq)
        z = harmon.decoder_condition(params, cfg, text, rows_mask.astype(bool), both(img), idx, valid)
        return gaussian_diffusion.trajectory_mean_logvar(
            params["head"], head_cfg, cfg.diffusion, _window(z, pos, guided),
            {"t": traj["t"][0], "x": _to_sampler(traj["x"])}, cfg_scale=jnp.repeat(scale, w)[:, None],
            guided=guided, num_steps=num_steps)

    per_iter = {"t": jnp.moveaxis(rollout["t"], 1, 0), "x": jnp.moveaxis(rollout["x"], 1, 0)}
    mean, log_var = jax.lax.map(lambda a: one_iteration(*a), tuple(jnp.moveaxis(rollout[k], 1, 0) for k in (
        "masked", "pos", "scale")) + (per_iter,))
    # [I, S, b*W, D] -> [b, I, S, W, D]
    mean, log_var = (jnp.moveaxis(x.reshape(n_iter, x.shape[1], b, w, -1), 2, 0) for x in (mean, log_var))
    return mean, log_var


def step_log_probs(params: dict, cfg: Any, rollout: dict, *, guided: bool, num_steps, temperature,
                   train_variance: bool = True) -> tuple:
    """``(log_probs [b, I, S, W], mean, log_var)`` of every recorded step under ``params``; the
    noiseless last step scores 0. The rollout's old log-probs and the update's come from here.
    ``train_variance=False``: the log-variances carry no gradient (same values)."""
    mean, log_var = step_means(params, cfg, rollout, guided=guided, num_steps=num_steps)
    if not train_variance:
        log_var = jax.lax.stop_gradient(log_var)
    logp = gaussian_diffusion.step_log_prob(mean, log_var, rollout["x_next"], temperature)
    return jnp.where(rollout["t"][..., None] > 0, logp, 0.0), mean, log_var


def rollout_steps(config: Any) -> str | None:
    """Diffusion steps of the decoder rollouts: ``grpo.decoder.rollout_steps`` (fewer than sampling's,
    as Flow-GRPO) or the sampling default."""
    return config.grpo.decoder.rollout_steps or config.sample.num_sampling_steps or None


# Rollout arrays with a diffusion-step axis (axis 2, first = noisiest).
STEP_KEYS = ("t", "x", "x_next", "old_log_probs", "ref_mean", "ref_log_var")
STEP_SELECTIONS = ("random", "noisiest")
# The anchor's supervised batch rides in the rollout under these keys (images as tokenizer tokens).
SFT_KEYS = ("t2i_latents", "t2i_tokens", "t2i_mask")
# The retain rollouts (``grpo.decoder.retain_weight``) ride in the rollout under this prefix: what
# :func:`step_means` and the KL read of an :func:`image_rollout`.
RETAIN_PREFIX = "retain_"
RETAIN_KEYS = ("image_tokens", "tokens", "mask", "uncond_tokens", "uncond_mask", "masked", "pos", "pos_valid",
               "scale", "t", "x", "ref_mean", "ref_log_var")


def as_retain(rollout: dict) -> dict:
    """An unscored :func:`image_rollout` packed to ride beside the scored one."""
    return {RETAIN_PREFIX + k: rollout[k] for k in RETAIN_KEYS}


def _sampling_kl(mean: jax.Array, log_var: jax.Array, rollout: dict, temperature) -> jax.Array:
    """``[b, I, S, W]`` closed-form KL of each step's Gaussian (variance scaled by the sampling
    temperature, as drawn) to the reference's."""
    tau2 = 2.0 * jnp.log(jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-30))
    return grpo_math.gaussian_kl(mean, log_var + tau2, rollout["ref_mean"], rollout["ref_log_var"] + tau2)


def retain_kl(params: dict, config: Any, rollout: dict) -> jax.Array:
    """Mean KL to the reference over every diffusion step (noisiest to last) of the retain
    rollouts: the policy's own draws of training long captions, unscored. It holds the
    sampler where the reference is already right (reconstruction), which the GenEval reward
    never asks for; unlike the supervised anchor it constrains the guided sampler itself."""
    s = config.sample
    r = {k[len(RETAIN_PREFIX):]: v for k, v in rollout.items() if k.startswith(RETAIN_PREFIX)}
    mean, log_var = step_means(params, config.model, r, guided=float(s.cfg) != 1.0,
                               num_steps=rollout_steps(config))
    if not config.grpo.decoder.train_variance:
        log_var = jax.lax.stop_gradient(log_var)
    kl = _sampling_kl(mean, log_var, r, s.temperature)
    counts = r["pos_valid"][:, :, None, :] & (r["t"] > 0)[..., None]
    return jnp.sum(kl * counts) / jnp.maximum(counts.sum(), 1)


def noisiest_steps(rollout: dict, fraction: float) -> dict:
    """The rollout cut to its first ``ceil(fraction * S)`` (noisiest) diffusion steps of every
    iteration: Flow-GRPO's ``timestep_fraction``. Those steps decide what is drawn where; the
    late, near-noiseless ones have tiny variances whose steep log-probs mostly add noise."""
    n = rollout["t"].shape[2]
    k = max(1, min(n, int(np.ceil(fraction * n))))
    return {**rollout, **{key: rollout[key][:, :, :k] for key in STEP_KEYS}}


def decoder_grpo_loss(params: dict, rollout: dict, rng: jax.Array, *, config: Any) -> tuple[jax.Array, dict]:
    g, s = config.grpo, config.sample
    guided = float(s.cfg) != 1.0
    fraction = g.decoder.step_fraction
    noisiest = g.decoder.step_selection == "noisiest"
    if noisiest:
        rollout = noisiest_steps(rollout, fraction)
    # train_variance False: only the step means move (DDPO / Flow-GRPO: fixed variances).
    logp, mean, log_var = step_log_probs(params, config.model, rollout, guided=guided, num_steps=rollout_steps(config),
                                         temperature=s.temperature, train_variance=g.decoder.train_variance)
    kl = _sampling_kl(mean, log_var, rollout, s.temperature)
    adv = rollout["advantages"][:, None, None, None]
    # Which (iteration, diffusion step) pairs train: the noisiest ones (already cut) or a random
    # fraction, the same for the batch.
    pairs = rollout["t"].shape[1:]
    keep = jnp.ones(pairs, bool) if noisiest else jax.random.uniform(rng, pairs) < fraction
    counts = (rollout["pos_valid"][:, :, None, :] & (rollout["t"] > 0)[..., None] & keep[None, ..., None]
              & rollout["group_valid"][:, None, None, None])
    # Elements that do not count (the noiseless last step, padded window slots) get the old
    # log-prob: ratio 1, so no inf * 0 in the value or its gradient.
    logp = jnp.where(counts, logp, rollout["old_log_probs"])
    obj, clipped = grpo_math.clipped_objective(logp, rollout["old_log_probs"], adv, g.epsilon, g.epsilon_high)
    b = counts.shape[0]
    flat = lambda x: x.reshape(b, -1)
    loss = grpo_math.aggregate(flat(-obj + g.beta * kl), flat(counts), g.loss_aggregation)
    n = jnp.maximum(counts.sum(), 1)
    metrics = {"grpo_loss": loss, "kl": jnp.sum(kl * counts) / n, "clip_fraction": jnp.sum(clipped & counts) / n,
               "ratio_max": jnp.max(jnp.where(counts, jnp.exp(logp - rollout["old_log_probs"]), 0.0))}
    if SFT_KEYS[0] in rollout:   # InstructGPT's PPO-ptx: the supervised T2I loss holds what GRPO does not reward
        sft, sft_metrics = supervised_anchor_loss(params, config.model, rollout, jax.random.fold_in(rng, 1))
        loss = loss + g.decoder.sft_weight * sft
        metrics = {**metrics, **{f"sft_{k}": v for k, v in sft_metrics.items() if k != "mask_ratio"}}
    if RETAIN_PREFIX + "x" in rollout:
        metrics["retain_kl"] = retain_kl(params, config, rollout)
        loss = loss + g.decoder.retain_weight * metrics["retain_kl"]
    return loss, metrics


def supervised_anchor_loss(params: dict, model_cfg: Any, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """The supervised text-to-image loss (diffusion + readout aid) of ``train_step`` on ``batch``."""
    return t2i_loss(params, model_cfg, batch, batch_image_tokens(None, model_cfg, batch, "t2i"), rng)


def decoder_grpo_step(state: TrainState, rollout: dict, rng: jax.Array, *, config: Any):
    """One GRPO step of the decoder policy on a scored rollout; pure (``rng``: the random step
    subset and the anchor's masks and noise)."""
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(functools.partial(decoder_grpo_loss, config=config), has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, rollout, rng)
    state, skipped = apply_gradients(state, grads, config.train.ema_decay, loss)
    return state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "nonfinite": skipped}

