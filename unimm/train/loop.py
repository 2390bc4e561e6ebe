"""The supervised training loop: mesh, tokenizer, state, data, jitted step, checkpoints, metrics.

``train_and_evaluate(config, workdir)`` resumes from ``workdir/checkpoints`` when it holds a
checkpoint, so re-running the same command after an interruption continues the run; the
result is bit-identical to an uninterrupted run (data position and step rng are restored).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import jax
from absl import logging

from unimm import checkpoint, inference, sharding
from unimm import resolve
from unimm.data import pipeline
from unimm.models import harmon, layers
from unimm.train import runner
from unimm.train.runner import EvalFn
from unimm.train.state import TrainState, create_train_state, param_shardings, state_shardings
from unimm.train.step import jit_train_step



def initial_params(config: Any, mesh: jax.sharding.Mesh, path: str | None = None,
                   key: str = "init_from") -> Any:
    """Params of ``path`` (default ``config.init_from``), born sharded; None = random. ``path``
    is a training workdir (its newest EMA params: fine-tuning or continuing another run) or a
    converter output directory; ``key`` names the setting in errors."""
    path = config.init_from if path is None else path
    if not path:
        return None
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return run_params(config, mesh, path, key)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            harmon.abstract_params(config.model), param_shardings(config, mesh))
    logging.info("initialising params from %s", path)
    params = checkpoint.load_params(path, abstract, optional=harmon.TRAINING_AIDS)
    for group in set(abstract) - set(params):   # converted Harmon weights have no training aids
        logging.info("%s has no %r params (a training aid): initialised fresh", key, group)
        params[group] = jax.jit(functools.partial(harmon.init_readout, config.model),
                                out_shardings=param_shardings(config, mesh)[group])(jax.random.key(config.seed))
    return params


def run_params(config: Any, mesh: jax.sharding.Mesh, workdir: str, key: str = "init_from") -> Any:
    """The newest EMA params of another training run's ``workdir``, for this config's model
    (restored through that run's own config: its optimizer layout)."""
    source = inference.load_config(workdir)
    shapes_of = lambda m: jax.tree.map(lambda a: a.shape, harmon.abstract_params(layers.freeze(m)))
    if shapes_of(source.model) != shapes_of(config.model):
        raise ValueError(f"config.{key}={workdir}: its model (variant {source.model.get('variant')}) "
                         f"does not match this config's (variant {config.model.get('variant')})")
    probe = create_train_state(source, mesh, jax.random.key(0))
    arrays, step = checkpoint.restore_arrays(checkpoint.make_manager(workdir, keep=1), probe)
    logging.info("%s: %s step %d (EMA params)", key, workdir, step)
    return jax.device_put(arrays["ema_params"], param_shardings(config, mesh))


def train_and_evaluate(config: Any, workdir: str, *, eval_fn: EvalFn | None = None) -> TrainState:
    """Supervised training to ``config.train.steps`` (``runner.run`` owns the run's life);
    ``eval_fn`` scores the state every ``train.eval_every`` steps and at the end."""
    mesh = sharding.make_mesh(resolve.mesh_shape(config))
    tok = resolve.make_tokenizer(config)
    config = resolve.resolve(config, tok, mesh)

    rng = jax.random.key(config.seed)
    state = create_train_state(config, mesh, rng, params=initial_params(config, mesh))
    iterator = pipeline.make_train_iterator(config, tok)
    train_step = None   # built from the first batch (the jit needs the batch's ranks)

    def advance(state: TrainState) -> tuple[TrainState, list[dict]]:
        nonlocal train_step
        batch = pipeline.global_batch(next(iterator), mesh)
        if train_step is None:
            train_step = jit_train_step(config, mesh, state_shardings(state), batch)
        state, metrics = train_step(state, batch, rng)
        return state, [metrics]

    def describe(scalars: dict) -> str:
        losses = " ".join(f"{k}={v:.4f}" for k, v in sorted(scalars.items()) if k.endswith("_loss"))
        return f"loss={scalars['loss']:.4f} {losses} steps/s={scalars['steps_per_sec']:.2f}"

    return runner.run(config, workdir, mesh, state, iterator, advance, describe, eval_fn=eval_fn)
