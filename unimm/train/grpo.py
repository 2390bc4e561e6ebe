"""Unified-GRPO, *generation for understanding*: the captioner is the policy.

Per image the policy samples ``G`` captions; a reward (e.g. how well a frozen decoder
rebuilds the image from the caption) scores them; group-relative advantages weight the
PPO-clipped log-ratio of every caption token, with a k3 KL to a frozen reference.

* :func:`token_log_probs` — per-token log-probs of a sequence under the captioner (the
  same function scores the rollout, the reference and the update, so the first PPO epoch
  has ratio exactly 1).
* :func:`caption_rollout` — jitted sampling of the group plus π_old / π_ref log-probs.
* :func:`caption_grpo_loss` and :func:`grpo_step` — ``grpo_step(state, rollout, rng) ->
  (state, metrics)``, pure; :func:`jit_grpo_step` jits it with shardings and donation
  like the supervised ``train_step``.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from unimm import sharding
from unimm.models import harmon, layers, qwen2
from unimm.train import grpo_math
from unimm.train.state import TrainState
from unimm.train.step import apply_gradients

# Keys of a caption rollout; all lead with the rollout batch B = inputs x G.
ROLLOUT_KEYS = ("tokens", "mask", "completion_mask", "image_tokens", "old_log_probs",
                "ref_log_probs", "advantages", "group_valid")


def token_log_probs(params: dict, cfg: Any, tokens: jax.Array, mask: jax.Array, image_tokens: jax.Array,
                    image_id: int, temperature: float = 1.0, first: int = 1) -> jax.Array:
    """``[B, T]``: entry ``t >= first`` is ``log π(tokens[:, t] | tokens[:, :t], image)`` for
    the sampling distribution at ``temperature``; entries before ``first`` are 0.

    Pass the prompt length as ``first`` to score the completion only: the LM head then
    projects ``T - first`` positions onto the vocabulary instead of ``T - 1`` (a prompt holds
    the image's slots, 1088 of them at 512 px, against a few hundred caption tokens).
    """
    if not 1 <= first < tokens.shape[1]:
        raise ValueError(f"token_log_probs: first={first} must lie in [1, {tokens.shape[1]})")
    embeds = harmon.understanding_embeds(params, cfg, tokens, image_tokens, image_id)
    mask = mask.astype(bool)
    hidden, _ = qwen2.forward(params["llm"], cfg.llm, embeds, qwen2.positions_from_mask(mask), mask)
    logits = qwen2.lm_logits(params["llm"], cfg.llm, hidden[:, first - 1:-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, first:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (first, 0)))


@functools.partial(jax.jit, static_argnums=(2,), static_argnames=(
    "group_size", "temperature", "max_new_tokens", "image_id", "eos_id", "pad_id"))
def caption_rollout(policy_params: dict, ref_params: dict, cfg: Any, prompt_tokens: jax.Array,
                    prompt_mask: jax.Array, image_tokens: jax.Array, rng: jax.Array, *, group_size: int,
                    temperature: float, max_new_tokens: int, image_id: int, eos_id: int, pad_id: int) -> dict:
    """``G`` sampled captions per image (rows ``i * G + g``) with their log-probs.

    ``prompt_tokens / prompt_mask [N, T]`` are left-padded understanding prompts holding the
    ``<image>`` slots; ``image_tokens [N, L, D]``. Returns the rollout without rewards:
    ``tokens / mask / completion_mask [N*G, T+M]``, ``image_tokens``, ``old_log_probs``
    (policy) and ``ref_log_probs`` (reference).
    """
    rep = lambda x: jnp.repeat(x, group_size, axis=0)
    tokens, mask, image_tokens = rep(prompt_tokens), rep(prompt_mask), rep(image_tokens)
    embeds = harmon.understanding_embeds(policy_params, cfg, tokens, image_tokens, image_id)
    out = qwen2.generate(policy_params["llm"], cfg.llm, tokens, max_new_tokens, temperature=temperature,
                         rng=rng, attention_mask=mask, eos_token_id=eos_id, pad_token_id=pad_id,
                         inputs_embeds=embeds)
    new = out[:, tokens.shape[1]:]
    # A completion token counts up to and including the first eos.
    before_eos = jnp.cumsum(new == eos_id, axis=1) - (new == eos_id)
    completion = before_eos == 0
    full_mask = jnp.concatenate([mask.astype(bool), completion], axis=1)
    completion_mask = jnp.concatenate([jnp.zeros_like(mask, bool), completion], axis=1)
    score = functools.partial(token_log_probs, cfg=cfg, tokens=out, mask=full_mask,
                              image_tokens=image_tokens, image_id=image_id, temperature=temperature,
                              first=tokens.shape[1])
    return {"tokens": out, "mask": full_mask, "completion_mask": completion_mask,
            "image_tokens": image_tokens, "old_log_probs": score(policy_params),
            "ref_log_probs": score(ref_params)}


def with_advantages(rollout: dict, rewards: jax.Array, g: Any) -> dict:
    """Adds ``advantages [B]`` and DAPO's ``group_valid [B]`` from ``rewards [N, G]``."""
    adv = grpo_math.advantages(g.advantage, rewards)
    if g.advantage_clip:
        adv = jnp.clip(adv, -g.advantage_clip, g.advantage_clip)
    valid = grpo_math.informative_groups(rewards) if g.drop_constant_groups else jnp.ones(rewards.shape[0], bool)
    return {**rollout, "advantages": adv.reshape(-1),
            "group_valid": jnp.repeat(valid, rewards.shape[1])}


def caption_grpo_loss(params: dict, rollout: dict, *, config: Any) -> tuple[jax.Array, dict]:
    g, cfg = config.grpo, config.model
    # Rollouts are prompt + max_new_tokens wide (caption_rollout); only the completion is scored.
    prompt_len = rollout["tokens"].shape[1] - g.captioner.max_new_tokens
    logp = token_log_probs(params, cfg, rollout["tokens"], rollout["mask"], rollout["image_tokens"],
                           config.data.image_token_id, g.captioner.temperature, first=prompt_len)
    adv = rollout["advantages"][:, None]
    obj, clipped = grpo_math.clipped_objective(logp, rollout["old_log_probs"], adv, g.epsilon, g.epsilon_high)
    kl = grpo_math.k3_kl(logp, rollout["ref_log_probs"])
    mask = rollout["completion_mask"] & rollout["group_valid"][:, None]
    loss = grpo_math.aggregate(-obj + g.beta * kl, mask, g.loss_aggregation)
    tokens = jnp.maximum(mask.sum(), 1)
    metrics = {"grpo_loss": loss, "kl": jnp.sum(kl * mask) / tokens,
               "clip_fraction": jnp.sum(clipped & mask) / tokens,
               "ratio_max": jnp.max(jnp.where(mask, jnp.exp(logp - rollout["old_log_probs"]), 0.0)),
               "caption_length": rollout["completion_mask"].sum(1).mean()}
    return loss, metrics


def grpo_step(state: TrainState, rollout: dict, rng: jax.Array, *, config: Any) -> tuple[TrainState, dict]:
    """One GRPO optimizer step on a scored rollout (``ROLLOUT_KEYS``); pure."""
    del rng   # the caption loss is deterministic given the rollout
    grad_fn = jax.value_and_grad(functools.partial(caption_grpo_loss, config=config), has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, rollout)
    state, skipped = apply_gradients(state, grads, config.train.ema_decay, loss)
    return state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "nonfinite": skipped}


def jit_grpo_step(config: Any, mesh: jax.sharding.Mesh, state_sharding: Any, rollout_example: dict,
                  step_fn: Any = None):
    """The jitted GRPO step (``grpo_step``, or ``step_fn`` such as the decoder policy's):
    state sharded as given (and donated), rollout over the data axes."""
    rollout_sharding = {k: sharding.batch_sharding(mesh, jnp.ndim(v)) for k, v in rollout_example.items()}
    return jax.jit(functools.partial(step_fn or grpo_step, config=layers.freeze(config)),
                   in_shardings=(state_sharding, rollout_sharding, sharding.replicated(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=(0,))


def shard_rollout(rollout: dict, mesh: jax.sharding.Mesh) -> dict:
    """The rollout laid out as :func:`jit_grpo_step` expects (split over the data axes)."""
    return {k: jax.device_put(v, sharding.batch_sharding(mesh, jnp.ndim(v))) for k, v in rollout.items()}


def caption_texts(tok: Any, rollout: dict, prompt_len: int) -> list[str]:
    """The sampled captions as text (completion tokens before eos)."""
    out = []
    for row, keep in zip(jax.device_get(rollout["tokens"][:, prompt_len:]),
                         jax.device_get(rollout["completion_mask"][:, prompt_len:])):
        ids = [int(i) for i, k in zip(row, keep) if k and i != tok.eos_id and i < tok.vocab_size]
        out.append(tok.decode(ids))
    return out

