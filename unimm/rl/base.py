"""What every GRPO policy gets and gives: :class:`RLContext` (the run's frozen pieces) and the
:class:`Policy` interface, with the registry that ``grpo.policy`` names."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar
from collections.abc import Callable

import jax
import numpy as np

from unimm.data import shapes


@dataclasses.dataclass(frozen=True)
class RLContext:
    """A GRPO run's fixed pieces, built once by the loop.

    ``ref``: the frozen reference params (π_ref). ``decoder``: the frozen model that draws
    images for the captioner policy and judges every policy's images; ``encoder``: the
    frozen model that captions training images for the decoder policy (both
    :class:`unimm.inference.model.Model`). ``reward_fn(source, generated, **reward_context)``
    scores images against their source images. ``keys``: ``rollout``, ``generate`` and
    ``retain`` rng streams, folded with the rollout number."""
    config: Any
    tok: Any
    mesh: jax.sharding.Mesh
    ref: Any
    decoder: Any
    encoder: Any
    reward_fn: Callable[..., np.ndarray]
    reward_context: dict
    keys: dict

    def training_images(self, indices: Any) -> np.ndarray:
        """uint8 ``[len(indices), H, W, 3]``: the shapes world's training images."""
        d = self.config.data
        images = [shapes.render(shapes.sample_scene(d.seed, i), d.image_size) for i in indices]
        return np.stack(images) if images else np.zeros((0, d.image_size, d.image_size, 3), np.uint8)


class Policy:
    """One GRPO policy. Subclasses set ``name``, ``step`` (``grpo_step``-shaped:
    ``step(state, rollout, rng, *, config) -> (state, metrics)``), ``frozen_decoder``
    (True: its images come from the run's frozen decoder, which evaluation then uses too) and
    ``settings`` (the group ``grpo.<settings>.*`` it reads, if any: the other groups stay at
    their defaults), and define:

    * ``rollout(ctx, state, n, indices) -> (rollout, drawn)``: the ``n``-th rollout, G samples
      for each input of ``indices``: the arrays the step needs (without advantages) and
      what :meth:`score` needs (e.g. images and their sources);
    * ``score(ctx, drawn) -> (rewards float32 [inputs * G], logged)``: rewards in rollout row
      order, and reward parts worth logging (name -> mean);
    * ``validate(g)``: clear errors for ``config.grpo`` settings this policy cannot run.
    """
    name: ClassVar[str]
    step: ClassVar[Callable[..., Any]]
    frozen_decoder: ClassVar[bool] = False
    settings: ClassVar[str | None] = None

    def validate(self, g: Any) -> None:
        """No policy-specific checks by default."""

    def rollout(self, ctx: RLContext, state: Any, n: int, indices: range) -> tuple[dict, Any]:
        raise NotImplementedError

    def score(self, ctx: RLContext, drawn: Any) -> tuple[np.ndarray, dict]:
        raise NotImplementedError


_POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: makes ``cls`` available as ``grpo.policy=cls.name``."""
    _POLICIES[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def get(name: str) -> Policy:
    if name not in _POLICIES:
        raise ValueError(f"grpo.policy={name!r}: expected one of {names()}")
    return _POLICIES[name]()
