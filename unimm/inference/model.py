"""A trained model bound to its params, for inference: captions and answers, images from
prompts (Harmon's CFG sampler), and RecA's image variation. Used by the CLIs, evaluation,
the GRPO rollouts' frozen decoder and the auto-encoder view."""
from __future__ import annotations

import functools
from typing import Any
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import images as images_lib
from unimm.data import text
from unimm.models import decoding as decoding_lib
from unimm.models import harmon, harmon_sample, layers, qwen2
from unimm.models import vae as vae_lib


class Model:
    """Inference helpers bound to one set of params (captioning and image generation)."""

    def __init__(self, config: Any, tok: Any, params: dict, tokenizer_params: Any,
                 decoder_params: dict | None = None):
        self.config, self.tok = config, tok
        self.cfg = layers.freeze(config.model)
        self.params, self.tokenizer_params = params, tokenizer_params
        # Generation may use other params (GRPO: the frozen decoder); default: the same.
        self.decoder_params = params if decoder_params is None else decoder_params

    def _image_tokens(self, images_uint8: np.ndarray) -> jax.Array:
        size = self.config.data.image_size
        x = np.stack([images_lib.to_model(images_lib.square_and_resize(np.asarray(im), size))
                      for im in images_uint8])
        return vae_lib.images_to_tokens(self.tokenizer_params, self.cfg.vae, jnp.asarray(x))

    def decoding(self) -> dict:
        """Caption decoding settings: ``config.sample``'s, those of ``sample.generation_config``
        when set, the tokenizer's eos (``<|im_end|>``, as Harmon passes) plus the file's."""
        s = self.config.sample
        settings = {"temperature": s.caption_temperature, "top_k": s.top_k, "top_p": s.top_p,
                    "repetition_penalty": s.repetition_penalty}
        eos = [self.tok.eos_id]
        if s.generation_config:
            found = decoding_lib.settings_from_generation_config(s.generation_config)
            eos += [i for i in found.pop("eos_token_ids", ()) if i not in eos]
            settings.update(found)
        decoding_lib.check_settings(**settings, what="config.sample")
        if not s.caption_sampling:   # greedy: HF applies only the penalty
            settings.update(temperature=0.0, top_k=0, top_p=1.0)
        return {**settings, "eos_id": eos}

    def answer(self, images_uint8: Sequence[np.ndarray], questions: Sequence[str],
               max_new_tokens: int | None = None, rng: jax.Array | None = None) -> list[str]:
        """Answers (captions) for images and their questions, decoded with :meth:`decoding`
        (``rng`` for sampled decoding; default key 0)."""
        d, tok = self.config.data, self.tok
        n_new = max_new_tokens or self.config.sample.max_new_tokens
        tokens, mask = text.left_pad([text.i2t_prompt_ids(tok, q, d.num_image_tokens) for q in questions],
                                     tok.pad_id)
        settings = self.decoding()
        out = harmon_sample.caption(self.params, self.cfg, tokens, mask, self._image_tokens(images_uint8),
                                    tok.image_id, n_new, pad_id=tok.pad_id,
                                    rng=jax.random.key(0) if rng is None else rng, **settings)
        return [self._text(row, settings["eos_id"]) for row in np.asarray(out[:, tokens.shape[1]:])]

    def generate(self, prompts: Sequence[str], rng: jax.Array) -> np.ndarray:
        """uint8 images ``[N, H, W, 3]`` for the prompts (Harmon's CFG sampler); with
        ``sample.plan`` drawn from the descriptions :meth:`plan` writes for them."""
        return self.generate_with_plans(prompts, rng)[0]

    def generate_with_plans(self, prompts: Sequence[str], rng: jax.Array) -> tuple[np.ndarray, list[str]]:
        """:meth:`generate`'s images and what they were drawn from: the plans with
        ``sample.plan``, else the prompts themselves."""
        s, tok = self.config.sample, self.tok
        prompts = list(prompts)
        if s.plan:
            k_plan, rng = jax.random.split(rng)
            prompts = self.plan(prompts, k_plan)
        length = text.sampling_prompt_len(tok, prompts, self.config)
        return self._draw(*text.t2i_rows(tok, prompts, length, guided=s.cfg != 1.0), rng), prompts

    def plan(self, prompts: Sequence[str], rng: jax.Array) -> list[str]:
        """The generator's LLM describes each prompt's scene in detail (the planning task,
        ``data.plan_batch_size``): sampled at ``sample.plan_temperature`` (0 = greedy), at most
        ``sample.max_new_tokens`` tokens, ending at the tokenizer's eos."""
        s, tok = self.config.sample, self.tok
        tokens, mask = text.left_pad([text.plan_prompt_ids(tok, p) for p in prompts], tok.pad_id)
        out = qwen2.generate(self.decoder_params["llm"], self.cfg.llm, tokens, s.max_new_tokens,
                             temperature=float(s.plan_temperature), rng=rng, attention_mask=mask,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        return [self._text(row) for row in np.asarray(out[:, tokens.shape[1]:])]

    def _text(self, ids: Sequence[int], eos: Sequence[int] | None = None) -> str:
        """Generated ids up to the first eos, as text."""
        eos = [self.tok.eos_id] if eos is None else eos
        ids = list(ids)
        ends = [k for k, i in enumerate(ids) if i in eos]
        ids = ids[:ends[0]] if ends else ids
        # The LM's vocabulary may be larger than the tokenizer's; ids past it are never
        # trained targets and carry no text (an untrained model does emit them).
        return self.tok.decode([i for i in ids if i < self.tok.vocab_size])

    def _draw(self, prompt: Any, mask: Any, rng: jax.Array) -> np.ndarray:
        """uint8 images for prompt rows (ids or embeddings; ``[cond; uncond]`` with CFG)."""
        d, s = self.config.data, self.config.sample
        grid = vae_lib.grid(self.cfg.vae, d.image_size)   # data.image_size: stage 3 may exceed the model's
        toks = harmon_sample.generate_image_tokens(
            self.decoder_params, self.cfg, prompt, mask, rng, num_iter=s.num_iter, guided=s.cfg != 1.0,
            cfg_scale=s.cfg, cfg_schedule=s.cfg_schedule, temperature=s.temperature,
            num_steps=s.num_sampling_steps or None, final_steps=s.final_sampling_steps, grid=grid[0],
            max_windows=s.max_windows)
        return np.asarray(vae_lib.to_uint8(vae_lib.tokens_to_images(self.tokenizer_params, self.cfg.vae, toks, grid)))

    def reconstruct(self, images_uint8: Sequence[np.ndarray], rng: jax.Array) -> np.ndarray:
        """RecA's image variation: uint8 images ``[N, H, W, 3]``, each drawn from a prompt whose
        image slots hold that image's own understanding embeddings (RecA's ``sample_recon``);
        the other half of CFG is the unconditional text prompt."""
        d, s, tok = self.config.data, self.config.sample, self.tok
        # Rows as long as the image prompt, or as the unconditional prompt's training length.
        length = max(len(text.i2t_prompt_ids(tok, text.RECON_INSTRUCTION, d.num_image_tokens)), int(d.max_t2i_len))
        row = text.recon_example(tok, text.RECON_INSTRUCTION, d.num_image_tokens, length, False)
        n, guided = len(images_uint8), s.cfg != 1.0
        tokens, mask = np.tile(row["tokens"], (n, 1)), np.tile(row["mask"], (n, 1))
        embeds = _understanding_embeds(self.decoder_params, self.cfg, jnp.asarray(tokens),
                                       self._image_tokens(images_uint8), tok.image_id)
        if guided:
            uncond = text.t2i_example(tok, "", length, True)
            uncond_embeds = _embed(self.decoder_params, self.cfg, jnp.tile(uncond["tokens"], (n, 1)))
            embeds = jnp.concatenate([embeds, uncond_embeds])
            mask = np.concatenate([mask, np.tile(uncond["mask"], (n, 1))])
        return self._draw(embeds, jnp.asarray(mask), rng)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _understanding_embeds(params, cfg, tokens, image_tokens, image_id):
    return harmon.understanding_embeds(params, cfg, tokens, image_tokens, image_id)


@functools.partial(jax.jit, static_argnums=1)
def _embed(params, cfg, tokens):
    return qwen2.embed(params["llm"], cfg.llm, tokens)
