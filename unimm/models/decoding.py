"""Next-token processing as ``transformers``' ``generate`` does it, for the KV-cache decoder.

The order and the rules are HF's logits processors: the repetition penalty (over every id
seen so far, the prompt's included when the prompt was given as ids), then — only when
sampling — temperature, top-k and top-p (nucleus), each removing tokens by setting their
logits to ``-inf``. Greedy decoding is the argmax of the penalised logits (HF applies the
penalty to greedy decoding too; Qwen2.5-Instruct's ``generation_config.json`` sets 1.1).

:func:`settings_from_generation_config` reads those settings from a model folder's
``generation_config.json`` (kept by ``unimm.convert``), which HF's ``generate`` applies
implicitly; pure JSON, no code runs.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from unimm import config_utils

# What generation_config.json may set here, and the value that leaves decoding unchanged.
NEUTRAL = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """HF ``RepetitionPenaltyLogitsProcessor``: for ids ``seen`` ([B, V] bool), negative
    logits are multiplied by ``penalty`` and the others divided by it."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def warp(logits: jax.Array, temperature, top_k: int, top_p) -> jax.Array:
    """HF's sampling warpers in their order: temperature, top-k (ties with the k-th kept),
    top-p (the smallest set of the largest probabilities whose mass exceeds ``top_p``; the
    best token always stays; None = off). Removed tokens get ``-inf``."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is None:   # off (1.0): skip the sort over the vocabulary
        return logits
    ascending = jnp.sort(logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = cumulative <= 1.0 - top_p
    removed = removed.at[..., -1].set(False)
    # The largest removed logit is the cut: every token at or below it goes.
    cut = jnp.max(jnp.where(removed, ascending, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits <= cut, -jnp.inf, logits)


def mark_seen(seen: jax.Array, ids: jax.Array) -> jax.Array:
    """``seen [B, V]`` with ``ids [B]`` or ``[B, T]`` set."""
    ids = ids.reshape(ids.shape[0], -1)
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    return seen.at[rows, ids].set(True, mode="drop")


def settings_from_generation_config(path: str) -> dict[str, Any]:
    """``repetition_penalty``, ``temperature``, ``top_k``, ``top_p`` and ``eos_token_ids`` (a
    tuple) of a ``generation_config.json`` (a file or the folder holding it); fields the file
    does not set are left out. Errors name the file and the field."""
    file = os.path.join(path, "generation_config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"generation config not found: {file}")
    raw = config_utils.read_json_object(file, "generation config")
    out: dict[str, Any] = {}
    for key, neutral in NEUTRAL.items():
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{file}: {key}={value!r} is not a number")
        out[key] = type(neutral)(value)
    eos = raw.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{file}: eos_token_id={eos!r} is not a token id or a list of them")
        out["eos_token_ids"] = tuple(ids)
    check_settings(**{k: v for k, v in out.items() if k in NEUTRAL}, what=file)
    return out


def check_settings(repetition_penalty=1.0, temperature=1.0, top_k=0, top_p=1.0,
                   what: str = "decoding") -> None:
    """HF's own limits on the settings (a clear error instead of NaNs)."""
    if not repetition_penalty > 0:
        raise ValueError(f"{what}: repetition_penalty={repetition_penalty} must be > 0")
    if not temperature > 0:
        raise ValueError(f"{what}: temperature={temperature} must be > 0")
    if top_k < 0:
        raise ValueError(f"{what}: top_k={top_k} must be >= 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"{what}: top_p={top_p} must be in (0, 1]")
