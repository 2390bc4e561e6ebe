"""The Unified-GRPO loop (captioner or decoder policy): rollout, reward, step, checkpoints, metrics.

``train_grpo(config, workdir)`` starts from ``config.init_from`` (a supervised workdir or a
converter output); that starting point is also the frozen reference π_ref and the frozen
decoder that turns captions back into images for the reward (``grpo.decoder_from`` names
another run's decoder instead: UAE's two models). The decoder policy's inputs are the frozen
encoder's captions of training images (the starting point's, or ``grpo.encoder_from``'s
run), GenEval prompts of the training split, or half of each (``grpo.prompts``). Re-running
resumes from the workdir's newest checkpoint (rollout position included).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from unimm import resolve, sharding
from unimm.data import images as images_lib
from unimm.data import pipeline, shapes, text
from unimm.eval import rewards, shapes_bench
from unimm.eval.evaluate import make_eval_fn
from unimm.inference.model import Model
from unimm.models import layers
from unimm.models import vae as vae_lib
from unimm.train import grpo, grpo_decoder, loop, runner
from unimm.train.state import create_train_state, frozen_groups, state_shardings


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


POLICIES = ("captioner", "decoder")
PROMPTS = ("captions", "geneval", "both")


def geneval_share(g: Any) -> int:
    """How many of a rollout's ``inputs_per_step`` inputs are GenEval prompts (the rest are
    training images, captioned by the frozen encoder)."""
    prompts, n = g.get("prompts", "captions"), g.inputs_per_step
    return {"captions": 0, "geneval": n, "both": n // 2}[prompts]


def validate_grpo(g: Any) -> None:
    """Clear errors for policy / prompt / reward combinations that cannot run together."""
    if g.policy not in POLICIES:
        raise ValueError(f"grpo.policy={g.policy!r}: expected one of {POLICIES}")
    prompts = g.get("prompts", "captions")
    if prompts not in PROMPTS:
        raise ValueError(f"grpo.prompts={prompts!r}: expected one of {PROMPTS}")
    if prompts != "captions" and g.policy != "decoder":
        raise ValueError(f"grpo.prompts={prompts!r} draws images for GenEval prompts: it needs grpo.policy='decoder'")
    if g.get("decoder_from") and g.policy != "captioner":
        raise ValueError("grpo.decoder_from sets the captioner policy's frozen decoder; the decoder policy "
                         "trains its own (leave grpo.decoder_from empty)")
    if g.get("encoder_from") and g.policy != "decoder":
        raise ValueError("grpo.encoder_from sets the decoder policy's frozen captioner; the captioner policy "
                         "is its own (leave grpo.encoder_from empty)")
    if g.get("encoder_from") and prompts == "geneval":
        raise ValueError("grpo.encoder_from captions training images, but grpo.prompts='geneval' uses none: "
                         "set grpo.prompts to 'captions' or 'both'")
    for key, does, none in (("sft", "adds the supervised text-to-image loss", "no supervised anchor"),
                            ("retain", "holds the decoder's sampler to the reference", "no retain rollouts")):
        weight = g.get(f"{key}_weight", 0.0)
        if weight and g.policy != "decoder":
            raise ValueError(f"grpo.{key}_weight {does}: it needs grpo.policy='decoder'")
        if weight < 0:
            raise ValueError(f"grpo.{key}_weight={weight}: expected >= 0 (0 = {none})")
        if weight and g.get(f"{key}_batch_size", 0) <= 0:
            raise ValueError(f"grpo.{key}_weight={weight} needs grpo.{key}_batch_size > 0 "
                             f"(got {g.get(f'{key}_batch_size', 0)})")
    if g.get("step_selection", "random") not in grpo_decoder.STEP_SELECTIONS:
        raise ValueError(f"grpo.step_selection={g.step_selection!r}: expected one of {grpo_decoder.STEP_SELECTIONS}")
    if not 0.0 < g.get("step_fraction", 1.0) <= 1.0:
        raise ValueError(f"grpo.step_fraction={g.step_fraction}: expected a fraction in (0, 1]")
    if g.reward == "geneval":
        raise ValueError("grpo.reward='geneval': grpo.reward scores images against their source image; "
                         "GenEval prompts (grpo.prompts='geneval' or 'both') are always scored by the GenEval check")


def decoder_rollout(config: Any, tok: Any, state: Any, ref: Any, captions: list[str], rng: jax.Array):
    """The decoder policy's rollout for ``captions`` (already repeated G times) and its images."""
    d, s = config.data, config.sample
    cfg = layers.freeze(config.model)
    tokens, mask = (jnp.asarray(a) for a in text.t2i_rows(tok, captions, d.max_t2i_len, guided=True))
    n = len(captions)
    grid = vae_lib.grid(cfg.vae, d.image_size)   # data.image_size: stage 3 may exceed the model's
    rollout = grpo_decoder.image_rollout(
        state.params, ref, cfg, tokens[:n], mask[:n], tokens[n:], mask[n:], rng, num_iter=s.num_iter,
        guided=float(s.cfg) != 1.0, cfg_scale=s.cfg, temperature=s.temperature,
        num_steps=grpo_decoder.rollout_steps(config), grid=grid[0])
    images = vae_lib.to_uint8(vae_lib.tokens_to_images(state.tokenizer_params, cfg.vae, rollout["image_tokens"], grid))
    return rollout, np.asarray(images)


def anchor_batch(config: Any, tok: Any, tokenizer_params: Any, n: int) -> dict:
    """The ``n``-th supervised batch of the decoder policy's PPO-ptx anchor (``grpo.sft_weight``):
    long captions of training scenes, CFG dropout as in supervised training; the images as the
    frozen tokenizer's tokens under :data:`grpo_decoder.SFT_KEYS`."""
    d, size = config.data, config.grpo.sft_batch_size
    encode = pipeline.example_encoder(d, tok, "t2i", lambda i: pipeline.shapes_t2i_item(
        d.seed, i, d.image_size, ("long_caption",)))
    rows = [encode((n * size + j, n * size + j)) for j in range(size)]
    images = jnp.asarray(np.stack([r["t2i_images"] for r in rows]))
    return {"t2i_latents": vae_lib.images_to_tokens(tokenizer_params, config.model.vae, images),
            "t2i_tokens": jnp.asarray(np.stack([r["t2i_tokens"] for r in rows])),
            "t2i_mask": jnp.asarray(np.stack([r["t2i_mask"] for r in rows]))}


def retain_scenes(config: Any, n: int) -> list:
    """The training scenes of the ``n``-th retain rollout (``grpo.retain_weight``)."""
    size = config.grpo.retain_batch_size
    return [shapes.sample_scene(config.data.seed, n * size + j) for j in range(size)]


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
    g, d = config.grpo, config.data
    frozen_groups(config)   # validates grpo.trainable before anything is built
    validate_grpo(g)
    if d.source != "shapes":
        raise ValueError("grpo: rollouts draw images from the shapes world (data.source='shapes')")
    mesh = sharding.make_mesh(loop.mesh_shape(config))
    rows = g.inputs_per_step * g.group_size
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % dp:
        raise ValueError(f"grpo.inputs_per_step x grpo.group_size = {rows} is not divisible by the "
                         f"data-parallel size {dp}")
    for key in ("sft", "retain"):
        if g.get(f"{key}_weight", 0.0) and g[f"{key}_batch_size"] % dp:
            raise ValueError(f"grpo.{key}_batch_size = {g[f'{key}_batch_size']} is not divisible by the "
                             f"data-parallel size {dp}")
    tok = resolve.make_tokenizer(config)
    resolve.set_derived_fields(config, tok)
    cfg = layers.freeze(config.model)

    rng = jax.random.key(config.seed)
    state = create_train_state(config, mesh, rng, params=starting_params(config, mesh))
    ref = jax.tree.map(jnp.copy, state.params)        # π_ref (and the frozen decoder by default)
    # UAE's two-model setup: the captioner policy's images may come from another run's decoder.
    decoder_params = (starting_params(config, mesh, g.decoder_from, "grpo.decoder_from")
                      if g.get("decoder_from") else ref)
    decoder = Model(config, tok, decoder_params, state.tokenizer_params)
    # The decoder policy's captions: the frozen starting point's, or another run's captioner
    # (``grpo.encoder_from``: UAE's two models, the understanding side fixed).
    encoder_params = (starting_params(config, mesh, g.encoder_from, "grpo.encoder_from")
                      if g.get("encoder_from") else None)
    encoder = (Model(config, tok, encoder_params, state.tokenizer_params)
               if g.get("encoder_from") else decoder)
    reward_fn = rewards.get_reward(g.reward)
    judges = shapes_bench.builtin_encoders(decoder, ("mar", "latent"))    # frozen: the reference's
    context = {"features": judges["mar"], "tokenize": judges["latent"]}
    positions = RolloutPosition(g.inputs_per_step)
    prompt, prompt_mask = text.left_pad(
        [text.i2t_prompt_ids(tok, text.LONG_CAPTION_Q, d.num_image_tokens)] * g.inputs_per_step, tok.pad_id)
    step_fn = None
    k_roll, k_gen = jax.random.split(jax.random.fold_in(rng, 1))
    k_retain = jax.random.fold_in(rng, 2)

    def captioner_rollout(state: Any, source: np.ndarray, n: int):
        """G captions per training image by the policy; their images by the frozen decoder."""
        image_tokens = vae_lib.images_to_tokens(state.tokenizer_params, cfg.vae,
                                                jnp.asarray(np.stack([images_lib.to_model(x) for x in source])))
        rollout = grpo.caption_rollout(
            state.params, ref, cfg, prompt, prompt_mask, image_tokens, jax.random.fold_in(k_roll, n),
            group_size=g.group_size, temperature=g.temperature, max_new_tokens=g.max_new_tokens,
            image_id=d.image_token_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        captions = grpo.caption_texts(tok, rollout, prompt.shape[1])
        return rollout, decoder.generate(captions, jax.random.fold_in(k_gen, n))

    def training_images(indices: Any) -> np.ndarray:
        images = [shapes.render(shapes.sample_scene(d.seed, i), d.image_size) for i in indices]
        return np.stack(images) if images else np.zeros((0, d.image_size, d.image_size, 3), np.uint8)

    def advance(state: Any) -> tuple[Any, list[dict]]:
        """One rollout, scored, then ``grpo.ppo_epochs`` optimizer steps on it."""
        nonlocal step_fn
        n, indices, repeat = positions.position, positions.next_indices(), g.group_size
        logged_parts = {}
        if g.policy == "captioner":
            source = training_images(indices)
            rollout, generated = captioner_rollout(state, source, n)
            reward = reward_fn(np.repeat(source, repeat, axis=0), generated, **context)
        else:   # G images per input: the frozen encoder's caption of a training image, or a GenEval prompt
            split = len(indices) - geneval_share(g)
            source = training_images(indices[:split])
            items = [shapes.geneval_prompt(d.seed, i) for i in indices[split:]]
            texts = [*(encoder.answer(source, [text.LONG_CAPTION_Q] * len(source)) if split else []),
                     *(prompt_text for _, prompt_text, _ in items)]
            rollout, generated = decoder_rollout(config, tok, state, ref, np.repeat(texts, repeat),
                                                 jax.random.fold_in(k_roll, n))
            rows = split * repeat
            reward = np.concatenate([
                reward_fn(np.repeat(source, repeat, axis=0), generated[:rows], **context) if split else [],
                rewards.geneval(None, generated[rows:], specs=[spec for *_, spec in items for _ in range(repeat)])
                if items else []]).astype(np.float32)
            parts = {"reward_captions": reward[:rows], "reward_geneval": reward[rows:]}
            logged_parts = {k: float(v.mean()) for k, v in parts.items() if v.size}
            if g.get("sft_weight", 0.0):
                rollout = {**rollout, **anchor_batch(config, tok, state.tokenizer_params, n)}
            if g.get("retain_weight", 0.0):   # the policy's own images of training long captions
                scenes = retain_scenes(config, n)
                kept, drawn = decoder_rollout(config, tok, state, ref, [shapes.long_caption(x) for x in scenes],
                                              jax.random.fold_in(k_retain, n))
                rollout = {**rollout, **grpo_decoder.as_retain(kept)}
                logged_parts["reward_retain"] = float(reward_fn(
                    np.stack([shapes.render(x, d.image_size) for x in scenes]), drawn, **context).mean())
        reward = jnp.asarray(reward.reshape(g.inputs_per_step, g.group_size))
        scored = grpo.shard_rollout(grpo.with_advantages(rollout, reward, g), mesh)
        if step_fn is None:
            step_fn = grpo.jit_grpo_step(config, mesh, state_shardings(state), scored, step_fn=(
                grpo.grpo_step if g.policy == "captioner" else grpo_decoder.decoder_grpo_step))
        stats = {**logged_parts, "reward_mean": float(reward.mean()), "reward_std": float(reward.std(axis=1).mean()),
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

    # The policy is scored; the captioner policy's images come from the frozen decoder, the
    # decoder policy's captions from grpo.encoder_from's run when set.
    eval_fn = make_eval_fn(config, workdir, tok, encoder_params=encoder_params,
                           decoder_params=decoder_params if g.policy == "captioner" else None) if evaluate else None
    return runner.run(config, workdir, mesh, state, positions, advance, describe, eval_fn=eval_fn, label="grpo ")
