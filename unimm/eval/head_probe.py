"""The diffusion head alone, on the shapes world's cells: can it draw the right object?

``python -m unimm.eval.head_probe [--config=configs/harmon.py:tiny] [--set=field=value ...]
[--steps=3000] [--p_object=0.111]``

MAR's head draws each token from ``p(token | z)``. In a GenEval-style image, a cell whose
object is not placed yet holds "a red square (either size) with probability p, else nothing":
a rare mode beside a common one. This probe trains the config's head (its loss, widths,
prediction target) on exactly that, with a learned vector per condition standing in for z
and none of the LLM or MAR in the way, then samples it the way the sampler does and reads
every token back with the shapes detector.

Conditions 0..31 are the (colour, shape) pairs, each present with probability
``p_object`` (default 1/9: one object, any of the 9 cells); condition 32 is the
unconditional row of classifier-free guidance (any object with probability 1/2). The tokens
are the tiny config's: one 8x8 pixel patch per cell (``model.vae.kind="patch"``).

Prints one JSON line per sampling setting: the share of tokens that come out as the right
object, an object of the wrong shape or colour, an empty cell, or neither (``junk``: a
smear the detector cannot read as an object), and ``right_given_object``.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unimm import config_utils
from unimm.data import images, shapes
from unimm.models import gaussian_diffusion, harmon, layers
from unimm.models.diffusion_head import DiffusionHead

OBJECTS = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]   # condition i = OBJECTS[i]
UNCOND = len(OBJECTS)
# (temperature, cfg, sampling steps): the tiny defaults' neighbourhood.
SETTINGS = ((1.0, 1.0, "25"), (1.0, 2.0, "25"), (1.3, 2.0, "25"), (0.7, 2.0, "25"), (1.0, 2.0, "100"))


def cell_tokens(cell_px: int) -> np.ndarray:
    """``[1 + 2 * len(OBJECTS), 3 * cell_px**2]``: the empty cell, then every (object, size)."""
    def token(scene):
        return images.to_model(shapes.render(scene, 3 * cell_px)[:cell_px, :cell_px]).reshape(-1)
    rows = [token(())] + [token((shapes.Obj(s, c, size, 0),)) for c, s in OBJECTS for size in shapes.SIZES]
    return np.stack(rows)


def draw(rng: jax.Array, n: int, p_object: float):
    """``n`` (condition, row of cell_tokens) pairs from the conditions' mixtures."""
    k_cond, k_size, k_any, k_present = jax.random.split(rng, 4)
    cond = jax.random.randint(k_cond, (n,), 0, UNCOND + 1)
    obj = jnp.where(cond == UNCOND, jax.random.randint(k_any, (n,), 0, UNCOND), cond)
    present = jax.random.uniform(k_present, (n,)) < jnp.where(cond == UNCOND, 0.5, p_object)
    return cond, jnp.where(present, 1 + 2 * obj + jax.random.randint(k_size, (n,), 0, 2), 0)


def classify(token: np.ndarray, want: tuple[str, str], empty: np.ndarray, cell_px: int) -> str:
    image = np.zeros((3 * cell_px, 3 * cell_px, 3), np.uint8)
    image[:cell_px, :cell_px] = np.clip(np.round((token.reshape(cell_px, cell_px, 3) + 1) * 127.5), 0, 255)
    found = shapes.detect(image)
    if not found:
        return "empty" if np.abs(token - empty).max() < 0.5 else "junk"
    o = found[0]
    if (o.color, o.shape) == want:
        return "right"
    return "wrong_color" if o.shape == want[1] else "wrong_shape" if o.color == want[0] else "wrong_both"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/harmon.py:tiny")
    ap.add_argument("--set", action="append", default=[], help="config override field=value (repeatable)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of the head")
    ap.add_argument("--batch", type=int, default=512, help="tokens per training step")
    ap.add_argument("--p_object", type=float, default=1 / 9, help="chance a conditioned cell holds its object")
    ap.add_argument("--samples", type=int, default=64, help="tokens drawn per condition and setting")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    config = config_utils.load_config(args.config)
    for s in args.set:
        config_utils.apply_override(config, s)
    m = config.model
    if m.vae.kind != "patch":
        raise ValueError(f"head_probe reads pixel-patch tokens; {args.config} has model.vae.kind={m.vae.kind!r}")
    cell_px = m.vae.patch_size
    head_cfg = layers.freeze(harmon.head_config(m))
    table = jnp.asarray(cell_tokens(cell_px))
    rng = jax.random.key(args.seed)
    k_head, k_emb, rng = jax.random.split(rng, 3)
    params = {"head": layers.init_params(DiffusionHead, head_cfg, k_head),
              "cond": jax.random.normal(k_emb, (UNCOND + 1, head_cfg.cond_dim))}
    o = config.optimizer
    opt = optax.adamw(o.lr, o.b1, o.b2, o.eps, weight_decay=0.0)
    opt_state = opt.init(params)

    def loss_fn(p, key):
        k_draw, k_loss = jax.random.split(key)
        cond, rows = draw(k_draw, args.batch, args.p_object)
        return gaussian_diffusion.diffusion_loss(p["head"], head_cfg, m.diffusion, table[rows], p["cond"][cond],
                                                 jnp.ones(args.batch), k_loss)

    @jax.jit
    def step(p, s, key):
        loss, grad = jax.value_and_grad(loss_fn)(p, key)
        updates, s = opt.update(grad, s, p)
        return optax.apply_updates(p, updates), s, loss

    t0 = time.perf_counter()
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(rng, i))
        if i % 1000 == 0 or i == args.steps - 1:
            print(json.dumps({"step": i, "loss": round(float(loss), 5), "seconds": round(time.perf_counter() - t0)}),
                  flush=True)

    conds = np.repeat(np.arange(UNCOND), args.samples)
    z = params["cond"][conds]
    for temperature, cfg_scale, steps in SETTINGS:
        zz = z if cfg_scale == 1.0 else jnp.concatenate([z, jnp.broadcast_to(params["cond"][UNCOND], z.shape)])
        tokens, _ = gaussian_diffusion.sample(params["head"], head_cfg, m.diffusion, zz, jax.random.key(args.seed + 1),
                                              temperature=temperature, cfg_scale=cfg_scale, num_steps=steps)
        kinds = [classify(t, OBJECTS[c], np.asarray(table[0]), cell_px) for c, t in zip(conds, np.asarray(tokens))]
        share = {k: round(kinds.count(k) / len(kinds), 3)
                 for k in ("right", "wrong_shape", "wrong_color", "wrong_both", "empty", "junk")}
        drawn = len(kinds) - kinds.count("empty") - kinds.count("junk")
        print(json.dumps({"prediction": m.diffusion.prediction, "temperature": temperature, "cfg": cfg_scale,
                          "sampling_steps": steps, **share,
                          "right_given_object": round(kinds.count("right") / max(drawn, 1), 3)}), flush=True)


if __name__ == "__main__":
    main()
