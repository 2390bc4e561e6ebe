"""The diffusion head alone, on the shapes world's cells: can it draw the right object?

``python -m unimm.eval.head_probe [--config=configs/harmon.py:tiny] [--set=field=value ...] [--code_dim=K]
[--steps=3000] [--p_object=0.111] [--objects=2]``

MAR's head draws each token from ``p(token | z)``. In a GenEval-style image, a cell whose
object is not placed yet holds "a red square (either size) with probability p, else nothing":
a rare mode beside a common one. This probe trains the config's head (its loss, widths,
prediction target) on exactly that, with a small learned encoder of the condition standing
in for the LLM and MAR (an MLP of the asked objects' one-hot colours and shapes, so that
conditions share what they have in common, as z computed from a prompt does), then samples
it the way the sampler does and reads every token back with the shapes detector.

With ``--objects=1`` (the default) the conditions are the 32 (colour, shape) pairs, each
present with probability ``p_object`` (default 1/9: one object, any of the 9 cells). With
``--objects=2`` they are the 672 ordered pairs of objects of different colours and shapes,
as in "a red square and a blue circle": the cell holds either object with probability
``p_object`` each, so the head must draw one whole mode of three, not a blend of them. The
last condition is the unconditional row of classifier-free guidance (any object with
probability 1/2). The tokens are the tiny config's: one 8x8 pixel patch per cell
(``model.vae.kind="patch"``), drawn as its ``--code_dim`` principal components (default: the
config's ``model.vae.code_dim``; here fitted on the 65 distinct cells) or as its 192 pixels.

Prints one JSON line per sampling setting: the share of tokens that come out as a requested
object (``right``), an object of the wrong shape or colour (``swapped``: both the colour and
the shape were asked for, on the other object), an empty cell, or neither (``junk``: a smear
the detector cannot read as an object), and ``right_given_object``.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unimm import config_utils
from unimm.data import images, shapes
from unimm.models import gaussian_diffusion, harmon, layers
from unimm.models import vae as vae_lib
from unimm.models.diffusion_head import DiffusionHead

OBJECTS = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]   # row 1 + 2 * i + size of cell_tokens
# (temperature, cfg, sampling steps): the tiny defaults' neighbourhood.
SETTINGS = ((1.0, 1.0, "25"), (1.0, 2.0, "25"), (1.3, 2.0, "25"), (0.7, 2.0, "25"), (1.0, 2.0, "100"))


def cell_tokens(cell_px: int) -> np.ndarray:
    """``[1 + 2 * len(OBJECTS), 3 * cell_px**2]``: the empty cell, then every (object, size)."""
    def token(scene):
        return images.to_model(shapes.render(scene, 3 * cell_px)[:cell_px, :cell_px]).reshape(-1)
    rows = [token(())] + [token((shapes.Obj(s, c, size, 0),)) for c, s in OBJECTS for size in shapes.SIZES]
    return np.stack(rows)


def conditions(objects: int) -> np.ndarray:
    """``[K, objects]`` indices into OBJECTS: every ordered choice of objects that share no
    colour and no shape (GenEval's colour-attribute prompts), or every object when 1."""
    if objects == 1:
        return np.arange(len(OBJECTS))[:, None]
    if objects != 2:
        raise ValueError(f"--objects={objects}: expected 1 or 2")
    return np.array([(i, j) for i, a in enumerate(OBJECTS) for j, b in enumerate(OBJECTS)
                     if a[0] != b[0] and a[1] != b[1]])


def condition_features(conds: np.ndarray) -> np.ndarray:
    """``[K, objects * (colours + shapes)]``: each asked object's one-hot colour and shape."""
    colors = np.array([shapes.COLORS.index(c) for c, _ in OBJECTS])[conds]
    kinds = np.array([shapes.SHAPES.index(s) for _, s in OBJECTS])[conds]
    onehot = np.concatenate([np.eye(len(shapes.COLORS))[colors], np.eye(len(shapes.SHAPES))[kinds]], -1)
    return onehot.reshape(len(conds), -1).astype(np.float32)


def init_encoder(rng: jax.Array, objects: int, width: int) -> dict:
    k1, k2, k3 = jax.random.split(rng, 3)
    n_in = objects * (len(shapes.COLORS) + len(shapes.SHAPES))
    return {"w1": jax.random.normal(k1, (n_in, width)) / np.sqrt(n_in), "b1": jnp.zeros(width),
            "w2": jax.random.normal(k2, (width, width)) / np.sqrt(width), "b2": jnp.zeros(width),
            "uncond": jax.random.normal(k3, (width,))}


def encode(p: dict, features: jax.Array, cond: jax.Array) -> jax.Array:
    """z for condition indices ``cond``; index ``len(features)`` is the unconditional one."""
    x = features[jnp.minimum(cond, len(features) - 1)]
    z = jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.where((cond == len(features))[:, None], p["uncond"], z)


def draw(rng: jax.Array, n: int, p_object: float, conds: jax.Array):
    """``n`` (condition, row of cell_tokens) pairs from the conditions' mixtures; condition
    ``len(conds)`` is the unconditional one."""
    k_cond, k_size, k_any, k_pick, k_present = jax.random.split(rng, 5)
    uncond = len(conds)
    cond = jax.random.randint(k_cond, (n,), 0, uncond + 1)
    picked = conds[jnp.minimum(cond, uncond - 1), jax.random.randint(k_pick, (n,), 0, conds.shape[1])]
    obj = jnp.where(cond == uncond, jax.random.randint(k_any, (n,), 0, len(OBJECTS)), picked)
    p = jnp.where(cond == uncond, 0.5, p_object * conds.shape[1])
    present = jax.random.uniform(k_present, (n,)) < p
    return cond, jnp.where(present, 1 + 2 * obj + jax.random.randint(k_size, (n,), 0, 2), 0)


def cell_code(pixels: np.ndarray, vae_cfg, dim: int):
    """The patch code (:func:`unimm.models.vae.fit_patch_code`, ``dim`` channels) fitted on the
    distinct cell tokens ``pixels`` [N, 3 p^2]: ``(codes [N, dim], decode)``, where ``decode``
    maps drawn codes back to cell tokens."""
    cfg = ml_collections.ConfigDict(dict(vae_cfg))
    cfg.code_dim = dim
    p = cfg.patch_size
    cells = pixels.reshape(-1, p, p, 3)    # a cell token is its patch in (row, col, rgb) order
    code = vae_lib.fit_patch_code(cfg, cells)
    codes = vae_lib.images_to_tokens(code, cfg, jnp.asarray(cells))[:, 0]

    def decode(x):
        return np.asarray(vae_lib.tokens_to_images(code, cfg, jnp.asarray(x)[:, None], (1, 1))).reshape(len(x), -1)
    return codes, decode


def classify(token: np.ndarray, want: list[tuple[str, str]], empty: np.ndarray, cell_px: int) -> str:
    """What ``token`` shows, given the (colour, shape) pairs ``want`` its condition asks for."""
    image = np.zeros((3 * cell_px, 3 * cell_px, 3), np.uint8)
    image[:cell_px, :cell_px] = np.clip(np.round((token.reshape(cell_px, cell_px, 3) + 1) * 127.5), 0, 255)
    found = shapes.detect(image)
    if not found:
        return "empty" if np.abs(token - empty).max() < 0.5 else "junk"
    o = found[0]
    colors, kinds = {c for c, _ in want}, {s for _, s in want}
    if (o.color, o.shape) in want:
        return "right"
    if o.color in colors and o.shape in kinds:
        return "swapped"
    return "wrong_color" if o.shape in kinds else "wrong_shape" if o.color in colors else "wrong_both"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/harmon.py:tiny")
    ap.add_argument("--set", action="append", default=[], help="config override field=value (repeatable)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of the head")
    ap.add_argument("--batch", type=int, default=512, help="tokens per training step")
    ap.add_argument("--p_object", type=float, default=1 / 9, help="chance a conditioned cell holds its object")
    ap.add_argument("--objects", type=int, default=1, help="objects a condition asks for: 1, or 2 "
                    "(the cell holds either: GenEval's colour-attribute prompts)")
    ap.add_argument("--samples", type=int, default=2048, help="tokens drawn per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--code_dim", type=int, default=None, help="> 0: the head draws this many principal "
                    "components of the cell tokens instead of the pixels (decoded back before reading); "
                    "0: the pixels (default: the config's model.vae.code_dim)")
    args = ap.parse_args(argv)
    config = config_utils.load_config(args.config)
    for s in args.set:
        config_utils.apply_override(config, s)
    m = config.model
    if m.vae.kind != "patch":
        raise ValueError(f"head_probe reads pixel-patch tokens; {args.config} has model.vae.kind={m.vae.kind!r}")
    cell_px = m.vae.patch_size
    if args.code_dim is None:
        args.code_dim = int(m.vae.code_dim)
    m.mar.token_dim = 3 * cell_px ** 2
    m.diffusion.clip_denoised = 1.0   # pixels live in [-1, 1] (a code: its own range, below)
    head_cfg = layers.freeze(harmon.head_config(m))
    pixels = cell_tokens(cell_px)
    table, decode = jnp.asarray(pixels), lambda x: x
    if args.code_dim:
        table, decode = cell_code(pixels, m.vae, args.code_dim)
        m.diffusion.clip_denoised = float(np.abs(table).max())
        head_cfg = harmon.head_config(m)
        head_cfg.token_dim = args.code_dim
        head_cfg = layers.freeze(head_cfg)
    conds = conditions(args.objects)
    rng = jax.random.key(args.seed)
    k_head, k_emb, rng = jax.random.split(rng, 3)
    params = {"head": layers.init_params(DiffusionHead, head_cfg, k_head),
              "cond": init_encoder(k_emb, args.objects, head_cfg.cond_dim)}
    cond_features = jnp.asarray(condition_features(conds))
    o = config.optimizer
    opt = optax.adamw(o.lr, o.b1, o.b2, o.eps, weight_decay=0.0)
    opt_state = opt.init(params)

    def loss_fn(p, key):
        k_draw, k_loss = jax.random.split(key)
        cond, rows = draw(k_draw, args.batch, args.p_object, jnp.asarray(conds))
        z = encode(p["cond"], cond_features, cond)
        return gaussian_diffusion.diffusion_loss(p["head"], head_cfg, m.diffusion, table[rows], z,
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

    asked = np.arange(args.samples) % len(conds)
    z = encode(params["cond"], cond_features, jnp.asarray(asked))
    uncond = encode(params["cond"], cond_features, jnp.full(z.shape[:1], len(conds)))
    for temperature, cfg_scale, steps in SETTINGS:
        zz = z if cfg_scale == 1.0 else jnp.concatenate([z, uncond])
        tokens, _ = gaussian_diffusion.sample(params["head"], head_cfg, m.diffusion, zz, jax.random.key(args.seed + 1),
                                              temperature=temperature, cfg_scale=cfg_scale, num_steps=steps)
        kinds = [classify(t, [OBJECTS[i] for i in conds[c]], pixels[0], cell_px)
                 for c, t in zip(asked, decode(np.asarray(tokens)))]
        share = {k: round(kinds.count(k) / len(kinds), 3)
                 for k in ("right", "swapped", "wrong_shape", "wrong_color", "wrong_both", "empty", "junk")}
        drawn = len(kinds) - kinds.count("empty") - kinds.count("junk")
        print(json.dumps({"prediction": m.diffusion.prediction, "temperature": temperature, "cfg": cfg_scale,
                          "sampling_steps": steps, **share,
                          "right_given_object": round(kinds.count("right") / max(drawn, 1), 3)}), flush=True)


if __name__ == "__main__":
    main()
