"""One run's life, shared by supervised training and GRPO.

:func:`run` restores the newest checkpoint of the workdir (the train state and the data
position together), then calls the loop's ``advance`` until ``train.steps``; around it, it
owns everything a run needs whatever it trains: the metric writer and progress report, the
non-finite guard, preemption (SIGTERM -> save -> return, agreed by every process), the log,
checkpoint and evaluation cadence, and the final save and evaluation. A loop supplies only
``advance(state) -> (state, records)`` (one optimizer step or several, e.g. a rollout and its
PPO epochs: one metrics dict per step taken, each with ``nonfinite``) and its log line.
"""
from __future__ import annotations

import signal
import time
from typing import Any
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from unimm import checkpoint
from unimm.train.state import TrainState

# advance(state) -> (state, one metrics dict per optimizer step taken)
Advance = Callable[[TrainState], tuple[TrainState, list[dict]]]
# eval_fn(state, step, writer): writes its own metrics; its return value is ignored.
EvalFn = Callable[[TrainState, int, Any], Any]


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

    def __enter__(self) -> Preemption:
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


def mean_metrics(history: list[dict]) -> dict:
    host = jax.device_get(history)   # one transfer per interval, not per step
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(before, after]`` (``every`` <= 0: never):
    the cadence stays right when one ``advance`` takes several steps."""
    return every > 0 and after // every > before // every


def run(config: Any, workdir: str, mesh: jax.sharding.Mesh, state: TrainState, data_state: Any,
        advance: Advance, describe: Callable[[dict], str], *, eval_fn: EvalFn | None = None,
        label: str = "") -> TrainState:
    """Trains ``state`` to ``config.train.steps``, resuming from ``workdir`` when it holds a
    checkpoint; ``data_state`` (a grain iterator, a rollout position: anything with
    ``get_state`` / ``set_state``) is saved and restored with it. ``eval_fn`` runs every
    ``train.eval_every`` steps and at the end, unless a preemption stopped the run (never
    when ``train.eval_every`` is 0). ``describe(scalars)`` gives the log line of an
    interval's mean metrics after ``"{label}step N/M "``."""
    # Here, not at the top: clu's writers import TensorFlow (~6 s), which the inference CLIs
    # (unimm.sample, caption, evaluate) reach through the loops' helpers but do not need.
    from clu import metric_writers, periodic_actions

    t = config.train
    manager = checkpoint.make_manager(workdir, t.keep_checkpoints)
    state, resumed = checkpoint.restore_latest(manager, state, data_state)
    step = int(jax.device_get(state.step))
    if resumed:
        logging.info("%sresumed from %s at step %d", label, manager.directory, step)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if step == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
    report = periodic_actions.ReportProgress(num_train_steps=t.steps, writer=writer,
                                             every_steps=t.log_every, every_secs=None)
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    evaluate = eval_fn is not None and t.eval_every > 0
    history: list[dict] = []
    last_time, last_step = time.perf_counter(), step

    with jax.set_mesh(mesh), Preemption() as preemption:
        while step < t.steps:
            before = step
            state, records = advance(state)
            for metrics in records:
                step += 1
                guard.observe(metrics["nonfinite"], step)
                report(step)
            history.extend(records)
            if crossed(before, step, t.log_every) or step >= t.steps:
                scalars = mean_metrics(history)
                now = time.perf_counter()
                scalars["steps_per_sec"] = (step - last_step) / (now - last_time)
                scalars["nonfinite_steps"] = guard.total
                last_time, last_step, history = now, step, []
                writer.write_scalars(step, scalars)
                logging.info("%sstep %d/%d %s", label, step, t.steps, describe(scalars))
            if preemption.should_stop():
                checkpoint.save(manager, state, data_state)
                manager.wait_until_finished()
                took = time.monotonic() - preemption.received_at
                logging.warning("preempted: step %d saved in %s %.1f s after SIGTERM; re-run the same "
                                "command to resume", step, manager.directory, took)
                if took > t.preemption_grace_secs:
                    logging.warning("the save took longer than train.preemption_grace_secs=%s",
                                    t.preemption_grace_secs)
                print(f"preempted at step {step}: checkpoint saved; re-run the same command to resume", flush=True)
                break
            if crossed(before, step, t.checkpoint_every) or step >= t.steps:
                checkpoint.save(manager, state, data_state)
            if evaluate and crossed(before, step, t.eval_every) and step < t.steps:
                eval_fn(state, step, writer)
        guard.flush()
        if evaluate and not preemption.requested:
            eval_fn(state, step, writer)

    manager.wait_until_finished()   # async saves must land before we return
    manager.close()
    writer.flush()
    return state
