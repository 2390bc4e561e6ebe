"""The decoder policy, *understanding for generation*: G images per input, drawn by the
policy's MAR sampler with every diffusion step recorded; the inputs are the frozen encoder's
captions of training images (scored against those images) and GenEval prompts of the
training split (scored by the GenEval check), as ``grpo.decoder.prompts`` mixes them. Options: a
supervised anchor batch (``grpo.decoder.sft_weight``) and retain rollouts that hold the sampler to
the reference (``grpo.decoder.retain_weight``). Trained by ``grpo_decoder.decoder_grpo_step``."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import pipeline, shapes, text
from unimm.eval import rewards
from unimm.models import layers
from unimm.models import vae as vae_lib
from unimm.rl.base import Policy, RLContext, register
from unimm.train import grpo_decoder

PROMPTS = ("captions", "geneval", "both")


def geneval_share(g: Any) -> int:
    """How many of a rollout's ``inputs_per_step`` inputs are GenEval prompts (the rest are
    training images, captioned by the frozen encoder)."""
    prompts, n = g.decoder.prompts, g.inputs_per_step
    return {"captions": 0, "geneval": n, "both": n // 2}[prompts]


def decoder_rollout(config: Any, tok: Any, state: Any, ref: Any, captions: list[str], rng: jax.Array):
    """The decoder policy's rollout for ``captions`` (already repeated G times) and its images."""
    d, s = config.data, config.sample
    cfg = layers.freeze(config.model)
    tokens, mask = (jnp.asarray(a) for a in text.t2i_rows(tok, captions, d.max_t2i_len, guided=True))
    n = len(captions)
    grid = vae_lib.grid(cfg.vae, d.image_size)   # data.image_size: stage 3 may exceed the model's
    rollout = grpo_decoder.image_rollout(
        state.params, ref, cfg, tokens[:n], mask[:n], tokens[n:], mask[n:], rng, num_iter=s.num_iter,
        guided=float(s.cfg) != 1.0, cfg_scale=s.cfg, cfg_schedule=s.cfg_schedule, temperature=s.temperature,
        num_steps=grpo_decoder.rollout_steps(config), grid=grid[0])
    images = vae_lib.to_uint8(vae_lib.tokens_to_images(state.tokenizer_params, cfg.vae, rollout["image_tokens"], grid))
    return rollout, np.asarray(images)


def anchor_batch(config: Any, tok: Any, tokenizer_params: Any, n: int) -> dict:
    """The ``n``-th supervised batch of the decoder policy's PPO-ptx anchor (``grpo.decoder.sft_weight``):
    long captions of training scenes, CFG dropout as in supervised training; the images as the
    frozen tokenizer's tokens under :data:`grpo_decoder.SFT_KEYS`."""
    d, size = config.data, config.grpo.decoder.sft_batch_size
    encode = pipeline.example_encoder(d, tok, "t2i", lambda i: pipeline.shapes_t2i_item(
        d.seed, i, d.image_size, ("long_caption",)))
    rows = [encode((n * size + j, n * size + j)) for j in range(size)]
    images = jnp.asarray(np.stack([r["t2i_images"] for r in rows]))
    return {"t2i_latents": vae_lib.images_to_tokens(tokenizer_params, config.model.vae, images),
            "t2i_tokens": jnp.asarray(np.stack([r["t2i_tokens"] for r in rows])),
            "t2i_mask": jnp.asarray(np.stack([r["t2i_mask"] for r in rows]))}


def retain_scenes(config: Any, n: int) -> list:
    """The training scenes of the ``n``-th retain rollout (``grpo.decoder.retain_weight``)."""
    size = config.grpo.decoder.retain_batch_size
    return [shapes.sample_scene(config.data.seed, n * size + j) for j in range(size)]


@register
class Decoder(Policy):
    name = "decoder"
    step = staticmethod(grpo_decoder.decoder_grpo_step)
    settings = "decoder"

    def validate(self, g: Any) -> None:
        d = g.decoder
        if d.prompts not in PROMPTS:
            raise ValueError(f"grpo.decoder.prompts={d.prompts!r}: expected one of {PROMPTS}")
        if d.encoder_from and d.prompts == "geneval":
            raise ValueError("grpo.decoder.encoder_from captions training images, but grpo.decoder.prompts='geneval' "
                             "uses none: set grpo.decoder.prompts to 'captions' or 'both'")
        for key, none in (("sft", "no supervised anchor"), ("retain", "no retain rollouts")):
            weight = d[f"{key}_weight"]
            if weight < 0:
                raise ValueError(f"grpo.decoder.{key}_weight={weight}: expected >= 0 (0 = {none})")
            if weight and d[f"{key}_batch_size"] <= 0:
                raise ValueError(f"grpo.decoder.{key}_weight={weight} needs grpo.decoder.{key}_batch_size > 0 "
                                 f"(got {d[f'{key}_batch_size']})")
        if d.step_selection not in grpo_decoder.STEP_SELECTIONS:
            raise ValueError(f"grpo.decoder.step_selection={d.step_selection!r}: expected one of "
                             f"{grpo_decoder.STEP_SELECTIONS}")
        if not 0.0 < d.step_fraction <= 1.0:
            raise ValueError(f"grpo.decoder.step_fraction={d.step_fraction}: expected a fraction in (0, 1]")

    def rollout(self, ctx: RLContext, state: Any, n: int, indices: range) -> tuple[dict, Any]:
        config, tok = ctx.config, ctx.tok
        g, d, repeat = config.grpo, config.data, config.grpo.group_size
        split = len(indices) - geneval_share(g)
        source = ctx.training_images(indices[:split])
        items = [shapes.geneval_prompt(d.seed, i) for i in indices[split:]]
        texts = [*(ctx.encoder.answer(source, [text.LONG_CAPTION_Q] * len(source)) if split else []),
                 *(prompt_text for _, prompt_text, _ in items)]
        rollout, generated = decoder_rollout(config, tok, state, ctx.ref, np.repeat(texts, repeat),
                                             jax.random.fold_in(ctx.keys["rollout"], n))
        drawn = {"source": np.repeat(source, repeat, axis=0), "generated": generated,
                 "specs": [spec for *_, spec in items for _ in range(repeat)]}
        if g.decoder.sft_weight:
            rollout = {**rollout, **anchor_batch(config, tok, state.tokenizer_params, n)}
        if g.decoder.retain_weight:   # the policy's own images of training long captions
            scenes = retain_scenes(config, n)
            kept, retained = decoder_rollout(config, tok, state, ctx.ref, [shapes.long_caption(x) for x in scenes],
                                             jax.random.fold_in(ctx.keys["retain"], n))
            rollout = {**rollout, **grpo_decoder.as_retain(kept)}
            drawn["retain"] = (np.stack([shapes.render(x, d.image_size) for x in scenes]), retained)
        return rollout, drawn

    def score(self, ctx: RLContext, drawn: Any) -> tuple[np.ndarray, dict]:
        rows = len(drawn["source"])
        generated = drawn["generated"]
        reward = np.concatenate([
            ctx.reward_fn(drawn["source"], generated[:rows], **ctx.reward_context) if rows else [],
            rewards.geneval(None, generated[rows:], specs=drawn["specs"]) if drawn["specs"] else []
        ]).astype(np.float32)
        parts = {"reward_captions": reward[:rows], "reward_geneval": reward[rows:]}
        logged = {k: float(v.mean()) for k, v in parts.items() if v.size}
        if "retain" in drawn:
            logged["reward_retain"] = float(ctx.reward_fn(*drawn["retain"], **ctx.reward_context).mean())
        return reward, logged
