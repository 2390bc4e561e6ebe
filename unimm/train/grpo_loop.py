"""The Unified-GRPO loop: any registered policy (``unimm.rl``: the captioner, the decoder) by
``grpo.policy``; each step is one rollout, its rewards and ``grpo.ppo_epochs`` updates, in
``unimm.train.runner``'s run (checkpoints, metrics, SIGTERM, evaluation cadence).

``train_grpo(config, workdir)`` starts from ``config.init_from`` (a supervised workdir or a
converter output); that starting point is also the frozen reference π_ref and the frozen
decoder that turns captions back into images for the reward (``grpo.captioner.decoder_from`` names
another run's decoder instead: UAE's two models). The decoder policy's inputs are the frozen
encoder's captions of training images (the starting point's, or ``grpo.decoder.encoder_from``'s
run), GenEval prompts of the training split, or half of each (``grpo.decoder.prompts``). Re-running
resumes from the workdir's newest checkpoint (rollout position included).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from unimm import resolve, rl, sharding
from unimm.eval import rewards, shapes_bench
from unimm.eval.evaluate import make_eval_fn
from unimm.inference.model import Model
from unimm.train import grpo, loop, runner
from unimm.train.state import create_train_state, state_shardings


class RolloutPosition:
    """Which shapes-world training images the next rollout uses (checkpointable)."""

    def __init__(self, per_rollout: int):
        self.position, self.per_rollout = 0, per_rollout

    def next_indices(self) -> range:
        start = self.position * self.per_rollout
        self.position += 1
        return range(start, start + self.per_rollout)

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def starting_params(config: Any, mesh: jax.sharding.Mesh, path: str | None = None,
                    key: str = "init_from") -> Any:
    """Params of ``path`` (default ``config.init_from``): a supervised workdir (its newest EMA
    params) or a converter output directory; None (random init) when it is empty."""
    path = config.init_from if path is None else path
    if not path:
        logging.warning("grpo: config.%s is empty; starting from random params", key)
        return None
    if path != config.init_from and not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ValueError(f"config.{key}={path}: expected a supervised workdir (with checkpoints/)")
    return loop.initial_params(config, mesh, path, key)


def train_grpo(config: Any, workdir: str, *, evaluate: bool = True):
    mesh = sharding.make_mesh(resolve.mesh_shape(config))
    tok = resolve.make_tokenizer(config)
    config = resolve.resolve(config, tok, mesh)
    g = config.grpo

    rng = jax.random.key(config.seed)
    state = create_train_state(config, mesh, rng, params=starting_params(config, mesh))
    ref = jax.tree.map(jnp.copy, state.params)        # π_ref (and the frozen decoder by default)
    # UAE's two-model setup: the captioner policy's images may come from another run's decoder.
    decoder_params = (starting_params(config, mesh, g.captioner.decoder_from, "grpo.captioner.decoder_from")
                      if g.captioner.decoder_from else ref)
    # The models outlive the state they came from: each step donates the state, its frozen
    # tokenizer params included, so they hold a copy (a fitted patch code's arrays would be freed).
    tokenizer = jax.tree.map(jnp.copy, state.tokenizer_params)
    decoder = Model(config, tok, decoder_params, tokenizer)
    # The decoder policy's captions: the frozen starting point's, or another run's captioner
    # (``grpo.decoder.encoder_from``: UAE's two models, the understanding side fixed).
    encoder_params = (starting_params(config, mesh, g.decoder.encoder_from, "grpo.decoder.encoder_from")
                      if g.decoder.encoder_from else None)
    encoder = (Model(config, tok, encoder_params, tokenizer)
               if g.decoder.encoder_from else decoder)
    judges = shapes_bench.builtin_encoders(decoder, ("mar", "latent"))    # frozen: the reference's
    positions = RolloutPosition(g.inputs_per_step)
    policy = rl.get(g.policy)
    ctx = rl.RLContext(config, tok, mesh, ref, decoder, encoder, rewards.get_reward(g.reward),
                       {"features": judges["mar"], "tokenize": judges["latent"]},
                       dict(zip(("rollout", "generate"), jax.random.split(jax.random.fold_in(rng, 1))),
                            retain=jax.random.fold_in(rng, 2)))
    step_fn = None

    def advance(state: Any) -> tuple[Any, list[dict]]:
        """One rollout, scored, then ``grpo.ppo_epochs`` optimizer steps on it."""
        nonlocal step_fn
        n, indices = positions.position, positions.next_indices()
        rollout, drawn = policy.rollout(ctx, state, n, indices)
        reward, logged = policy.score(ctx, drawn)
        reward = jnp.asarray(reward.reshape(g.inputs_per_step, g.group_size))
        scored = grpo.shard_rollout(grpo.with_advantages(rollout, reward, g), mesh)
        if step_fn is None:
            step_fn = grpo.jit_grpo_step(config, mesh, state_shardings(state), scored, step_fn=policy.step)
        stats = {**logged, "reward_mean": float(reward.mean()), "reward_std": float(reward.std(axis=1).mean()),
                 "groups_kept": scored["group_valid"].mean()}
        records = []
        for _ in range(g.ppo_epochs):
            state, metrics = step_fn(state, scored, rng)
            records.append({**metrics, **stats})
        return state, records

    def describe(scalars: dict) -> str:
        length = f" caption_length={scalars['caption_length']:.1f}" if "caption_length" in scalars else ""
        return (f"reward={scalars['reward_mean']:.3f} kl={scalars['kl']:.4f} "
                f"clip={scalars['clip_fraction']:.3f}{length}")

    # The policy is scored; a policy that draws with the frozen decoder is evaluated with it,
    # and captions come from grpo.decoder.encoder_from's run when set.
    eval_fn = make_eval_fn(config, workdir, tok, encoder_params=encoder_params,
                           decoder_params=decoder_params if policy.frozen_decoder else None) if evaluate else None
    return runner.run(config, workdir, mesh, state, positions, advance, describe, eval_fn=eval_fn, label="grpo ")
