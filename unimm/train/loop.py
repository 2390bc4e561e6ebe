"""The supervised training loop: mesh, tokenizer, state, data, jitted step, checkpoints, metrics.

``train_and_evaluate(config, workdir)`` resumes from ``workdir/checkpoints`` when it holds a
checkpoint, so re-running the same command after an interruption continues the run; the
result is bit-identical to an uninterrupted run (data position and step rng are restored).
"""
from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from unimm import checkpoint, sharding
from unimm.data import pipeline, text
from unimm.data.tokenizer import HFTokenizer
from unimm.models import harmon, layers
from unimm.models import vae as vae_lib
from unimm.train.state import TrainState, create_train_state, param_shardings, state_shardings
from unimm.train.step import jit_train_step

# eval_fn(state, step, writer): writes its own metrics; its return value is ignored.
EvalFn = Callable[[TrainState, int, Any], Any]


def make_tokenizer(config: Any):
    path = config.data.tokenizer
    return text.shapes_tokenizer() if path == "" else HFTokenizer(path)


def mesh_shape(config: Any) -> dict:
    mesh = config.sharding.mesh
    return mesh.to_dict() if hasattr(mesh, "to_dict") else dict(mesh)


def check_batch_sizes(config: Any, mesh: jax.sharding.Mesh) -> None:
    """Each task's global batch is split over the data-parallel axes (data x fsdp), and the
    mix of tasks trains something: weights >= 0, one task with examples and weight > 0."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    weights = {task: float(config.train.get(f"{task}_weight", 1.0)) for task in pipeline.TASKS}
    for task, w in weights.items():
        if w < 0:
            raise ValueError(f"train.{task}_weight={w}: expected >= 0")
    if not any(pipeline.batch_size(config.data, t) > 0 and weights[t] > 0 for t in pipeline.TASKS):
        mix = ", ".join(f"{t}: batch {pipeline.batch_size(config.data, t)} x weight {weights[t]:g}"
                        for t in pipeline.TASKS)
        raise ValueError(f"no task trains ({mix}); give one task data.<task>_batch_size > 0 and "
                         "train.<task>_weight > 0")
    for task in pipeline.TASKS:
        size = pipeline.batch_size(config.data, task)
        if size % dp:
            raise ValueError(
                f"data.{task}_batch_size={size} is not divisible by the data-parallel size {dp} "
                f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} from "
                f"sharding.mesh={mesh_shape(config)}); change the batch size or the mesh")


def set_derived_fields(config: Any, tok: Any) -> None:
    """Fields that follow from the tokenizer and the data resolution: ``data.image_token_id``,
    ``data.num_image_tokens`` (the token grid of ``data.image_size`` plus the buffers; a
    ``data.image_size`` above ``model.image_size`` is stage 3's higher resolution) and
    ``data.i2t_seq_len`` (the understanding sequence length)."""
    if tok.vocab_size > config.model.llm.vocab_size:
        raise ValueError(f"tokenizer {config.data.tokenizer or '(built-in shapes)'} has "
                         f"{tok.vocab_size} tokens but model.llm.vocab_size is "
                         f"{config.model.llm.vocab_size}")
    with config.unlocked():
        if int(config.train.stage) == 3 and config.data.image_size == config.model.image_size:
            # Stage 3's preset: twice the model's native resolution (Harmon: 256 -> 512 px).
            config.data.image_size = 2 * config.model.image_size
            logging.info("train.stage=3: data.image_size set to %d", config.data.image_size)
    h, w = vae_lib.grid(config.model.vae, config.data.image_size)
    d = config.data
    with config.unlocked():   # config_flags hands out a locked ConfigDict
        d.image_token_id = int(tok.image_id)
        d.num_image_tokens = h * w + config.model.mar.buffer_size
        # 0 follows the grid (stage 3, another data.image_size): image tokens + text budget.
        d.i2t_seq_len = int(d.max_i2t_len) or d.num_image_tokens + int(d.i2t_text_len)
        if "recon_text_len" in d:   # older runs' config.json predate RecA
            d.recon_seq_len = d.num_image_tokens + int(d.recon_text_len)
    if d.i2t_seq_len <= d.num_image_tokens:
        raise ValueError(f"data.max_i2t_len={d.max_i2t_len} leaves no room for text beside the "
                         f"{d.num_image_tokens} image tokens of data.image_size={d.image_size}; set it "
                         "to 0 (image tokens + data.i2t_text_len)")


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
    """The newest EMA params of another training run's ``workdir``, for this config's model."""
    from unimm import inference   # the run's own config: its optimizer layout, to restore its state
    source = inference.load_config(workdir)
    shapes_of = lambda m: jax.tree.map(lambda a: a.shape, harmon.abstract_params(layers.freeze(m)))
    if shapes_of(source.model) != shapes_of(config.model):
        raise ValueError(f"config.{key}={workdir}: its model (variant {source.model.get('variant')}) "
                         f"does not match this config's (variant {config.model.get('variant')})")
    probe = create_train_state(source, mesh, jax.random.key(0))
    arrays, step = checkpoint.restore_arrays(checkpoint.make_manager(workdir, keep=1), probe)
    logging.info("%s: %s step %d (EMA params)", key, workdir, step)
    return jax.device_put(arrays["ema_params"], param_shardings(config, mesh))


class Preemption:
    """SIGTERM (what schedulers and TPU maintenance send before killing a job) asks the loop
    to save the current step and return. With several processes, a stop any process saw
    is agreed on by all of them at the same step (one small all-gather per step)."""

    def __init__(self):
        self.requested, self._previous = False, None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        except ValueError:   # not the main thread: leave signals alone
            pass

    def _on_signal(self, signum, frame):
        self.requested, self.received_at = True, time.monotonic()
        logging.warning("SIGTERM received: saving at the end of this step, then stopping")

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def __enter__(self) -> "Preemption":
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; ``limit`` in a row stops training (0 = never).

    Each step's flag is read one step late, so checking never stalls the device queue."""

    def __init__(self, limit: int):
        self.limit, self.total, self.run, self._pending = int(limit), 0, 0, None

    def observe(self, flag: jax.Array, step: int) -> None:
        self.flush()
        self._pending = (flag, step)

    def flush(self) -> None:
        if self._pending is None:
            return
        flag, step = self._pending
        self._pending = None
        if float(jax.device_get(flag)):
            self.total += 1
            self.run += 1
            logging.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, self.run)
            if self.limit and self.run >= self.limit:
                raise FloatingPointError(
                    f"{self.run} steps in a row (up to step {step}) had a non-finite loss or gradient "
                    f"(train.max_nonfinite_steps={self.limit}); params were left unchanged by those steps. "
                    f"Lower optimizer.lr, check the data, or resume from the last checkpoint")
        else:
            self.run = 0


def _mean_metrics(history: list[dict]) -> dict:
    host = jax.device_get(history)   # one transfer per interval, not per step
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def train_and_evaluate(config: Any, workdir: str, *, eval_fn: EvalFn | None = None) -> TrainState:
    # Here, not at the top: clu's writers import TensorFlow (~6 s), which the inference CLIs
    # (unimm.sample, caption, evaluate: they import this module for its helpers) do not need.
    from clu import metric_writers, periodic_actions

    t = config.train
    mesh = sharding.make_mesh(mesh_shape(config))
    check_batch_sizes(config, mesh)
    tok = make_tokenizer(config)
    set_derived_fields(config, tok)

    rng = jax.random.key(config.seed)
    state = create_train_state(config, mesh, rng, params=initial_params(config, mesh))
    iterator = pipeline.make_train_iterator(config, tok)
    manager = checkpoint.make_manager(workdir, t.keep_checkpoints)
    state, resumed = checkpoint.restore_latest(manager, state, iterator)
    step = int(jax.device_get(state.step))
    if resumed:
        logging.info("resumed from %s at step %d", manager.directory, step)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if step == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
    report = periodic_actions.ReportProgress(num_train_steps=t.steps, writer=writer,
                                             every_steps=t.log_every, every_secs=None)
    guard = NonFiniteGuard(t.get("max_nonfinite_steps", 10))
    evaluate = eval_fn is not None and t.eval_every > 0
    train_step = None   # built from the first batch (the jit needs the batch's ranks)
    history: list[dict] = []
    last_time, last_step = time.perf_counter(), step

    with jax.set_mesh(mesh), Preemption() as preemption:
        while step < t.steps:
            batch = pipeline.global_batch(next(iterator), mesh)
            if train_step is None:
                train_step = jit_train_step(config, mesh, state_shardings(state), batch)
            state, metrics = train_step(state, batch, rng)
            step += 1
            guard.observe(metrics["nonfinite"], step)
            history.append(metrics)
            report(step)
            if step % t.log_every == 0 or step == t.steps:
                scalars = _mean_metrics(history)
                now = time.perf_counter()
                scalars["steps_per_sec"] = (step - last_step) / (now - last_time)
                scalars["nonfinite_steps"] = guard.total
                last_time, last_step, history = now, step, []
                writer.write_scalars(step, scalars)
                losses = " ".join(f"{k}={v:.4f}" for k, v in sorted(scalars.items())
                                  if k.endswith("_loss"))
                logging.info("step %d/%d loss=%.4f %s steps/s=%.2f", step, t.steps,
                             scalars["loss"], losses, scalars["steps_per_sec"])
            if preemption.should_stop():
                checkpoint.save(manager, state, iterator)
                manager.wait_until_finished()
                took = time.monotonic() - preemption.received_at
                logging.warning("preempted: step %d saved in %s %.1f s after SIGTERM; re-run the same "
                                "command to resume", step, manager.directory, took)
                if took > t.get("preemption_grace_secs", 30):
                    logging.warning("the save took longer than train.preemption_grace_secs=%s",
                                    t.preemption_grace_secs)
                print(f"preempted at step {step}: checkpoint saved; re-run the same command to resume", flush=True)
                break
            if step % t.checkpoint_every == 0 or step == t.steps:
                checkpoint.save(manager, state, iterator)
            if evaluate and step % t.eval_every == 0 and step < t.steps:
                eval_fn(state, step, writer)
        guard.flush()
        if evaluate and not preemption.requested:
            eval_fn(state, step, writer)

    manager.wait_until_finished()   # async saves must land before we return
    manager.close()
    writer.flush()
    return state
