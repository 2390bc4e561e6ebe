"""Rewards for Unified-GRPO: how well a generated image matches its source image.

Every reward is ``fn(source, generated, **context) -> float32 [B]`` on uint8 images
``[B, H, W, 3]``; ``context`` carries what a reward may need (e.g. ``features``, a
function images -> ``[B, C]``). Register new ones with :func:`register_reward`.

* ``shapes_match`` (default in the shapes world): the detector's scenes of the two images;
  1 for an exact structural match, otherwise the matched objects over the larger count.
* ``feature_cosine``: cosine of the two images' features from a frozen image encoder
  (:func:`mar_features`: the MAR encoder's mean-pooled output, or any JAX encoder).
* ``latent_similarity``: cosine of the two images' tokenizer latents (``context["tokenize"]``).
* Several names joined by ``+`` (``grpo.reward='shapes_match+latent_similarity'``): their mean.
* ``geneval`` (not a ``grpo.reward``: the loop scores GenEval-prompt rollouts with it; they
  have no source image): 1 when the detector's scene satisfies the prompt's spec
  (``specs``), else 0.
"""
from __future__ import annotations

import functools
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import images as images_lib
from unimm.data import shapes
from unimm.models import harmon, layers
from unimm.models import vae as vae_lib

RewardFn = Callable[..., np.ndarray]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return add


def get_reward(name: str) -> RewardFn:
    """A registered reward, or the mean of several joined by ``+`` (``"shapes_match+latent_similarity"``:
    the exact structure plus a graded similarity that still ranks images once structures all match)."""
    names = [n.strip() for n in name.split("+")]
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}, or several joined by '+'")
    fns = [REWARDS[n] for n in names]
    if len(fns) == 1:
        return fns[0]
    return lambda source, generated, **context: np.mean(
        [fn(source, generated, **context) for fn in fns], axis=0).astype(np.float32)


def scene_match(want: shapes.Scene, got: shapes.Scene) -> float:
    """1.0 for equal scenes, else |objects in both| / max(|want|, |got|) (0 for two empty)."""
    if want == got:
        return 1.0
    common = len(set(want) & set(got))
    return common / max(len(want), len(got))


@register_reward("shapes_match")
def shapes_match(source: np.ndarray, generated: np.ndarray, **_: Any) -> np.ndarray:
    return np.array([scene_match(shapes.detect(s), shapes.detect(g)) for s, g in zip(source, generated)],
                    np.float32)


def geneval(source: Any, generated: np.ndarray, *, specs: list[dict] | None = None, **_: Any) -> np.ndarray:
    if specs is None:
        raise ValueError("the GenEval reward needs the prompts' specs")
    return np.array([shapes.check_geneval(spec, shapes.detect(g)) for spec, g in zip(specs, generated)],
                    np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float32).reshape(len(a), -1), np.asarray(b, np.float32).reshape(len(b), -1)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)


@register_reward("feature_cosine")
def feature_cosine(source: np.ndarray, generated: np.ndarray, *, features: Callable, **_: Any) -> np.ndarray:
    return cosine(features(source), features(generated))


@register_reward("latent_similarity")
def latent_similarity(source: np.ndarray, generated: np.ndarray, *, tokenize: Callable, **_: Any) -> np.ndarray:
    return cosine(tokenize(source), tokenize(generated))


def _model_input(images_uint8: np.ndarray, size: int) -> jax.Array:
    return jnp.asarray(np.stack([images_lib.to_model(images_lib.square_and_resize(np.asarray(im), size))
                                 for im in images_uint8]))


# Module-level jits with the weights as arguments: compiled once per config (not once per
# evaluation) and the weights are never baked into the program as constants.
@functools.partial(jax.jit, static_argnums=1)
def _latents(tokenizer_params: Any, vae_cfg: Any, x: jax.Array) -> jax.Array:
    return vae_lib.images_to_tokens(tokenizer_params, vae_cfg, x)


@functools.partial(jax.jit, static_argnums=1)
def _mar_pooled(params: dict, cfg: Any, tokenizer_params: Any, x: jax.Array) -> jax.Array:
    toks = vae_lib.images_to_tokens(tokenizer_params, cfg.vae, x)
    x_enc, _ = harmon.visual_features(params, cfg, toks, *harmon.full_visibility(*toks.shape[:2]))
    return x_enc[:, cfg.mar.buffer_size:].mean(1)


def tokenizer_latents(cfg: Any, tokenizer_params: Any, image_size: int) -> Callable:
    """images uint8 -> tokenizer latents ``[B, L, D]`` (for ``latent_similarity``)."""
    vae_cfg = layers.freeze(cfg).vae
    return lambda images: np.asarray(_latents(tokenizer_params, vae_cfg, _model_input(images, image_size)))


def mar_features(params: dict, cfg: Any, tokenizer_params: Any, image_size: int) -> Callable:
    """images uint8 -> the frozen MAR encoder's mean-pooled features ``[B, C]`` (nothing masked)."""
    cfg = layers.freeze(cfg)
    return lambda images: np.asarray(_mar_pooled(params, cfg, tokenizer_params, _model_input(images, image_size)))
