"""The captioner policy, *generation for understanding*: G captions per training image,
sampled by the policy; the frozen decoder draws each caption; the reward compares each
drawing with its source image. Trained by ``grpo.grpo_step`` (token-level PPO + k3 KL)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import images as images_lib
from unimm.data import text
from unimm.models import layers
from unimm.models import vae as vae_lib
from unimm.rl.base import Policy, RLContext, register
from unimm.train import grpo


@register
class Captioner(Policy):
    name = "captioner"
    step = staticmethod(grpo.grpo_step)
    frozen_decoder = True
    settings = "captioner"

    def rollout(self, ctx: RLContext, state: Any, n: int, indices: range) -> tuple[dict, Any]:
        """The policy's G captions of each training image; the frozen decoder's images of them."""
        config, tok = ctx.config, ctx.tok
        g, d, cfg = config.grpo, config.data, layers.freeze(config.model)
        source = ctx.training_images(indices)
        # Built once a run; the policy is a registry singleton, so the key holds what it depends on.
        key = (id(tok), d.num_image_tokens, len(source))
        if getattr(self, "_prompt", (None,))[0] != key:
            self._prompt = (key, text.left_pad(
                [text.i2t_prompt_ids(tok, text.LONG_CAPTION_Q, d.num_image_tokens)] * len(source), tok.pad_id))
        prompt, prompt_mask = self._prompt[1]
        image_tokens = vae_lib.images_to_tokens(state.tokenizer_params, cfg.vae,
                                                jnp.asarray(np.stack([images_lib.to_model(x) for x in source])))
        rollout = grpo.caption_rollout(
            state.params, ctx.ref, cfg, prompt, prompt_mask, image_tokens,
            jax.random.fold_in(ctx.keys["rollout"], n), group_size=g.group_size, temperature=g.captioner.temperature,
            max_new_tokens=g.captioner.max_new_tokens, image_id=d.image_token_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        captions = grpo.caption_texts(tok, rollout, prompt.shape[1])
        generated = ctx.decoder.generate(captions, jax.random.fold_in(ctx.keys["generate"], n))
        return rollout, (np.repeat(source, g.group_size, axis=0), generated)

    def score(self, ctx: RLContext, drawn: Any) -> tuple[np.ndarray, dict]:
        source, generated = drawn
        return np.asarray(ctx.reward_fn(source, generated, **ctx.reward_context), np.float32), {}
