"""The arithmetic of GRPO and its variants, shared by both Unified-GRPO policies.

Group-relative advantages (a registry: ``grpo``, ``drgrpo``, ``rloo``), DAPO's filter of
groups whose rewards are all equal, the PPO clipped objective with ``ε_low`` / ``ε_high``,
the k3 KL estimator for tokens, the closed-form Gaussian KL for diffusion steps, and the
loss aggregations. Rewards and advantages are laid out ``[num_inputs, group_size]``.
Pure jax.numpy; no model code.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AdvantageFn = Callable[[jax.Array], jax.Array]
ADVANTAGES: dict[str, AdvantageFn] = {}

# Keeps a group whose rewards barely differ from turning into huge advantages (GRPO's ε).
STD_EPS = 1e-4


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Adds ``fn(rewards [N, G]) -> advantages [N, G]`` to :data:`ADVANTAGES`."""
    def add(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn
    return add


@register_advantage("grpo")
def grpo_advantages(rewards: jax.Array) -> jax.Array:
    """DeepSeekMath: ``(r - mean) / (std + ε)`` within each group (population std)."""
    mean = rewards.mean(axis=1, keepdims=True)
    return (rewards - mean) / (rewards.std(axis=1, keepdims=True) + STD_EPS)


@register_advantage("drgrpo")
def drgrpo_advantages(rewards: jax.Array) -> jax.Array:
    """Dr. GRPO: ``r - mean``, no division by the group's std."""
    return rewards - rewards.mean(axis=1, keepdims=True)


@register_advantage("rloo")
def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """Leave-one-out baseline: ``r_i - mean(r_j, j != i)``."""
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("rloo advantages need a group size >= 2")
    others = (rewards.sum(axis=1, keepdims=True) - rewards) / (g - 1)
    return rewards - others


def advantages(name: str, rewards: jax.Array) -> jax.Array:
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGES)}")
    return ADVANTAGES[name](rewards)


def informative_groups(rewards: jax.Array) -> jax.Array:
    """DAPO's dynamic sampling: ``bool [N]``, False where every reward of the group is equal
    (all advantages are zero, so the group would only add KL and dilute the mean)."""
    return rewards.max(axis=1) > rewards.min(axis=1)


def clipped_objective(log_probs: jax.Array, old_log_probs: jax.Array, adv: jax.Array,
                      eps_low: float, eps_high: float) -> tuple[jax.Array, jax.Array]:
    """Per element ``min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A)`` with ``ρ = exp(logp - logp_old)``,
    and where the clip was active (the ratio left the trust region in A's direction)."""
    ratio = jnp.exp(log_probs - old_log_probs)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return jnp.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per sampled token:
    ``π_ref/π_θ - log(π_ref/π_θ) - 1`` (non-negative, unbiased)."""
    d = ref_log_probs - log_probs
    return jnp.exp(d) - d - 1.0


def gaussian_kl(mean: jax.Array, log_var: jax.Array, ref_mean: jax.Array, ref_log_var: jax.Array) -> jax.Array:
    """``KL(N(mean, e^log_var) || N(ref_mean, e^ref_log_var))`` summed over the last axis.
    With equal variances it is Flow-GRPO's ``||μ - μ_ref||² / (2σ²)``."""
    kl = 0.5 * (ref_log_var - log_var + (jnp.exp(log_var) + (mean - ref_mean) ** 2) * jnp.exp(-ref_log_var) - 1.0)
    return kl.sum(-1)


LOSS_AGGREGATIONS = ("seq-mean-token-mean", "token-mean")


def aggregate(values: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Reduces per-element ``values [B, T]`` over ``mask [B, T]`` (1 = counts).

    ``seq-mean-token-mean`` (GRPO): each sequence's masked mean, then the mean over
    sequences that have any element. ``token-mean`` (DAPO, Dr. GRPO): one mean over every
    masked element, so long sequences weigh more.
    """
    mask = mask.astype(values.dtype)
    if mode == "token-mean":
        return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    if mode == "seq-mean-token-mean":
        n = mask.sum(axis=1)
        per_seq = (values * mask).sum(axis=1) / jnp.maximum(n, 1.0)
        has = (n > 0).astype(values.dtype)
        return (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")
