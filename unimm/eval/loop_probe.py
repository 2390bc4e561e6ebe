"""Does a trained model draw the object a prompt still lacks, late in the MAR loop?

``python -m unimm.eval.loop_probe --workdir=DIR [--masked=9,5,3,2,1] [--num_per_prompt=16]
[--rounds=4] [--cfg=2.0]``

For the one-object prompts "a photo of a SHAPE", every cell but ``n`` is given as drawn and
empty (black), and the ``n`` masked cells are drawn in one step from the model's condition,
with the run's sampling settings (CFG, temperature, diffusion steps). A prompt for one
object asks for exactly one object among the masked cells, whatever ``n``: at ``n = 1`` the
last cell must hold it. The share of images with none, one or more objects there (read by
the shapes detector) shows whether the model follows what is still missing at each stage of
the loop, not only at its start (``n = 9``, where the prompt alone conditions every cell).

Prints one JSON line per ``n``: the mean number of objects drawn in the masked cells (1 is
right) and the shares with none, one, and more than one.
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from unimm import inference
from unimm.data import shapes, text
from unimm.models import gaussian_diffusion, harmon, harmon_sample
from unimm.models import vae as vae_lib


def one_step_draw(model, tokens: np.ndarray, mask: np.ndarray, background: jax.Array, n_masked: int,
                  rng: jax.Array, cfg_scale: float) -> tuple[jax.Array, jax.Array]:
    """``(tokens [B, L, D], masked [B, L])``: ``n_masked`` random cells (the same for every
    row) drawn in one step after prompts ``[cond; uncond]``, the other cells ``background``."""
    return _draw(model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(mask, bool), background, rng,
                 jnp.float32(cfg_scale), jnp.float32(model.config.sample.temperature), n_masked)


@functools.partial(jax.jit, static_argnums=(1, 8))
def _draw(params, cfg, tokens, mask, background, rng, cfg_scale, temperature, n_masked):
    seq, dim, b = cfg.mar.grid ** 2, cfg.mar.token_dim, tokens.shape[0] // 2
    k_order, k_draw = jax.random.split(rng)
    masked = jnp.zeros((b, seq), bool).at[:, jax.random.permutation(k_order, seq)[:n_masked]].set(True)
    img = jnp.broadcast_to(background, (b, seq, dim))
    cache = harmon_sample.prefill(params, cfg, tokens, mask, seq)
    both = lambda x: jnp.concatenate([x, x])
    z = harmon_sample.cached_condition(params, cfg, cache, mask, both(img), both(masked))
    rows = z.reshape(-1, z.shape[-1])
    x0, _ = gaussian_diffusion.sample(params["head"], harmon.head_config(cfg), cfg.diffusion, rows, k_draw,
                                      temperature=temperature, cfg_scale=cfg_scale, guided=True)
    x0 = x0 + harmon.head_offset(params, cfg, rows, True, cfg_scale)
    return jnp.where(masked[..., None], x0.reshape(b, seq, dim), img), masked


def probe(model, masked_counts, num_per_prompt: int, rounds: int, cfg_scale: float) -> list[dict]:
    d, cfg, tok = model.config.data, model.cfg, model.tok
    prompts = [f"a photo of {'an' if s[0] in 'aeiou' else 'a'} {s}" for s in shapes.SHAPES]
    rows = [p for p in prompts for _ in range(num_per_prompt)]
    tokens, mask = text.t2i_rows(tok, rows, text.sampling_prompt_len(tok, rows, model.config), guided=True)
    grid = (cfg.mar.grid, cfg.mar.grid)
    black = jnp.full((1, d.image_size, d.image_size, 3), -1.0)
    background = vae_lib.images_to_tokens(model.tokenizer_params, cfg.vae, black)[0]
    out = []
    for n in masked_counts:
        found = []
        for r in range(rounds):
            img, masked = one_step_draw(model, tokens, mask, background, n, jax.random.key(r), cfg_scale)
            pictures = np.asarray(vae_lib.to_uint8(vae_lib.tokens_to_images(model.tokenizer_params, cfg.vae,
                                                                             img, grid)))
            for picture, cells in zip(pictures, np.asarray(masked)):
                drawn = {o.cell for o in shapes.detect(picture)}
                found.append(sum(int(c) in drawn for c in np.flatnonzero(cells)))
        found = np.asarray(found)
        out.append({"masked": n, "objects_drawn": float(found.mean()), "none": float(np.mean(found == 0)),
                    "one": float(np.mean(found == 1)), "more": float(np.mean(found > 1)), "images": len(found)})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unimm.eval.loop_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--masked", default="9,5,3,2,1", help="masked cells per image, comma separated")
    parser.add_argument("--num_per_prompt", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="draws of the masked cells per image")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's)")
    args = parser.parse_args(argv)
    config = inference.load_config(args.workdir)
    if config.data.source != "shapes":
        parser.error(f"the probe needs a shapes-world run (data.source='shapes'), not {config.data.source!r}")
    counts = [int(n) for n in args.masked.split(",")]
    if not all(1 <= n <= config.model.mar.grid ** 2 for n in counts):
        parser.error(f"--masked={args.masked}: each count must lie in [1, {config.model.mar.grid ** 2}]")
    model, step = inference.load_model(config, args.workdir)
    cfg_scale = config.sample.cfg if args.cfg is None else args.cfg
    for row in probe(model, counts, args.num_per_prompt, args.rounds, cfg_scale):
        print(json.dumps({"step": step, "cfg": cfg_scale, **row}), flush=True)


if __name__ == "__main__":
    main()
