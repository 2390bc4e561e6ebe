"""Orbax checkpoints: the train state's arrays + the data iterator's position.

Each step directory under ``workdir/checkpoints`` is a Composite (MaxText
``common/checkpointing.py`` style) of

* ``state``: ``{"step", "params", "opt_state", "ema_params"}`` (PyTreeSave, the files StandardSave writes); the static
  optimizer ``tx`` is code, and the frozen ``tokenizer_params`` are re-created the same way
  at start-up, so neither is stored;
* ``data``: ``iterator.get_state()`` (JSON; grain iterator states are small dicts).

Restoring both resumes training exactly where it stopped: the step's randomness is
``fold_in(rng, step)`` and the iterator continues from the saved stream position.

``load_params`` reads the params written by ``python -m unimm.convert`` (``DST/params``).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

STATE_KEYS = ("step", "params", "opt_state", "ema_params")


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The ``state`` item's handler (the files StandardSave writes).

    Replica-parallel saving (each replica of a replicated array writes one slice of it)
    spreads device-to-host copies over a TPU host's links, and orbax already turns it off
    on GPU. On CPU every device shares the host's memory: it buys nothing and compiles one
    slice program per (shape, offset), 200 programs and ~9 s on the tiny model's first
    save over 8 devices. So off the TPU the arrays are written whole by their first
    replica."""
    if jax.default_backend() == "tpu":
        return ocp.PyTreeCheckpointHandler()
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()), (jax.Array, th.ArrayHandler(use_replica_parallel=False)),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """An async CheckpointManager in ``workdir/checkpoints`` keeping the newest ``keep``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options, item_handlers={
                                     "state": _state_handler(), "data": ocp.JsonCheckpointHandler()})


def _arrays(state: Any) -> dict:
    return {k: getattr(state, k) for k in STATE_KEYS}


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding of each array: the restore target, so arrays land sharded."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _restore_args(state: Any) -> ocp.args.PyTreeRestore:
    target = _abstract(_arrays(state))
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def save(manager: ocp.CheckpointManager, state: Any, iterator: Any) -> bool:
    """Starts an async save at ``state.step``. Device buffers are copied to host before this
    returns, so the next (donating) train step may reuse them."""
    step = int(jax.device_get(state.step))
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(_arrays(state)),
        data=ocp.args.JsonSave(iterator.get_state())))


def restore_latest(manager: ocp.CheckpointManager, state: Any, iterator: Any) -> tuple[Any, bool]:
    """Restores the newest *valid* checkpoint into ``state``'s shardings and ``iterator``'s position.

    Returns ``(state, restored)``; ``state`` is returned unchanged when there is none. A step
    that cannot be read (truncated files, a missing item) is set aside as ``<step>.broken``
    (renamed, never deleted) and the next older one is tried; a checkpoint whose arrays do
    not fit ``state`` (another architecture) is an error naming the differences.
    """
    broken = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            where = os.path.join(manager.directory, str(step), "state")
            meta = ocp.StandardCheckpointer().metadata(where)
            meta = getattr(meta, "item_metadata", meta)
            saved = _leaf_shapes(getattr(meta, "tree", meta)) if meta is not None else {}
            if not saved:
                raise FileNotFoundError(f"no array metadata in {where}")
        except Exception as e:  # unreadable metadata: a damaged step
            broken.append((step, e))
            continue
        mismatch = _tree_mismatch(saved, _leaf_shapes(_arrays(state)))
        if mismatch:
            raise ValueError(f"checkpoint step {step} in {manager.directory} was written by another "
                             f"model ({mismatch}); use a new --workdir or the config that wrote it")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=_restore_args(state),
                data=ocp.args.JsonRestore()))
            iterator.set_state(restored["data"])
        except Exception as e:
            broken.append((step, e))
            continue
        _set_aside(manager, broken, restored_step=step)
        return state.replace(**restored["state"]), True
    if broken:
        details = "; ".join(f"step {s}: {type(e).__name__}: {_first_line(e)}" for s, e in broken)
        raise ValueError(f"no checkpoint in {manager.directory} could be restored ({details}); "
                         f"move the directory away to start afresh")
    return state, False


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _set_aside(manager: ocp.CheckpointManager, broken: list, restored_step: int) -> None:
    """Renames damaged steps newer than the restored one, so that training can write those
    step numbers again without touching anything that was there."""
    if not broken:
        return
    for step, e in broken:
        src = os.path.join(manager.directory, str(step))
        dst = f"{src}.broken"
        n = 1
        while os.path.exists(dst):
            dst, n = f"{src}.broken{n}", n + 1
        if jax.process_index() == 0:
            os.rename(src, dst)
        logging.warning("checkpoint step %d is damaged (%s: %s); moved to %s, resuming from step %d",
                        step, type(e).__name__, _first_line(e), dst, restored_step)
    manager.reload()


def _tree_mismatch(saved: dict, want: dict) -> str:
    """'' when the two ``{path: shape}`` maps agree, else a short list of the differences."""
    if saved == want:
        return ""
    missing = sorted(set(want) - set(saved))[:5]
    extra = sorted(set(saved) - set(want))[:5]
    wrong = sorted(k for k in set(want) & set(saved) if want[k] != saved[k])[:5]
    return "; ".join(f"{name}: {keys}" for name, keys in
                     (("missing", missing), ("unexpected", extra), ("shape mismatch", wrong)) if keys)


def _key_name(k: Any) -> str:
    # Orbax stores list entries under string keys ("0"): compare paths by their names only.
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_shapes(tree: Any) -> dict:
    return {"/".join(_key_name(k) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def load_params(path: str, abstract_params: Any, optional: tuple[str, ...] = ()) -> Any:
    """Params from a converter output dir (``path/params``), restored into the shardings of
    ``abstract_params`` (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``, or arrays).
    Top-level groups named in ``optional`` may be absent from the saved tree; they are then
    absent from the result too (the caller initialises them).

    Raises FileNotFoundError / ValueError naming ``path`` when it is not a converter output
    or its parameter tree does not fit the configured model.
    """
    target = os.path.join(os.path.abspath(path), "params")
    if not os.path.isdir(target):
        raise FileNotFoundError(
            f"init_from={path!r}: no params/ directory at {target} "
            "(expected the output directory of `python -m unimm.convert`)")
    ckptr = ocp.StandardCheckpointer()
    # Compare structure and shapes first: a clear message instead of an orbax internal one.
    try:
        meta = ckptr.metadata(target).item_metadata
    except Exception as e:  # not an orbax checkpoint, or unreadable
        raise ValueError(f"init_from={path!r}: cannot read an orbax checkpoint at {target}: {e}") from e
    saved = _leaf_shapes(getattr(meta, "tree", meta)) if meta is not None else {}
    if not saved:
        raise ValueError(f"init_from={path!r}: cannot read an orbax checkpoint at {target} (no array "
                         "metadata; expected the output directory of `python -m unimm.convert`)")
    absent = [k for k in optional if k in abstract_params and not any(n.split("/")[0] == k for n in saved)]
    abstract_params = {k: v for k, v in abstract_params.items() if k not in absent}
    mismatch = _tree_mismatch(saved, _leaf_shapes(abstract_params))
    if mismatch:
        raise ValueError(f"init_from={path!r}: the parameters in {target} do not fit the "
                         f"configured model ({mismatch})")
    return ckptr.restore(target, _abstract(abstract_params))


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict:
    """``{path: shape}`` of the train-state arrays saved at ``step`` (from the metadata only)."""
    where = os.path.join(manager.directory, str(step), "state")
    try:
        meta = ocp.StandardCheckpointer().metadata(where)
        meta = getattr(meta, "item_metadata", meta)
        saved = _leaf_shapes(getattr(meta, "tree", meta)) if meta is not None else {}
    except Exception as e:  # missing or unreadable files
        raise ValueError(f"checkpoint step {step} in {manager.directory} cannot be read "
                         f"({type(e).__name__}: {_first_line(e)})") from e
    if not saved:
        raise ValueError(f"checkpoint step {step} in {manager.directory} has no array metadata")
    return saved


def _check_fits(manager: ocp.CheckpointManager, step: int, saved: dict, want: dict) -> None:
    mismatch = _tree_mismatch(saved, want)
    if mismatch:
        raise ValueError(f"checkpoint step {step} in {manager.directory} was written by another "
                         f"model ({mismatch}); pass the --config that wrote it")


def check_params_fit(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> None:
    """Raises a ValueError naming the missing / unexpected / mis-shaped params when the
    checkpoint's ``params`` do not fit ``abstract_params`` (nothing is restored or built)."""
    saved = {k[len("params/"):]: v for k, v in saved_shapes(manager, step).items()
             if k.startswith("params/")}
    _check_fits(manager, step, saved, _leaf_shapes(abstract_params))


def restore_arrays(manager: ocp.CheckpointManager, state: Any) -> tuple[dict, int]:
    """The newest checkpoint's ``{"step", "params", "ema_params"}`` (inference and init_from
    need no optimizer state or data iterator), restored into ``state``'s shardings, and its
    step. The optimizer state is left on disk, so a checkpoint whose optax chain had another
    structure (another optimizer setting, an older version) still loads. A checkpoint whose
    params do not fit ``state`` is a ValueError naming the differing arrays."""
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    arrays = {k: v for k, v in _arrays(state).items() if k != "opt_state"}
    saved = {k: v for k, v in saved_shapes(manager, step).items() if not k.startswith("opt_state/")}
    _check_fits(manager, step, saved, _leaf_shapes(arrays))
    target = _abstract(arrays)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return restored["state"], int(step)


def read_step_arrays(workdir: str, step: int) -> Any:
    """A checkpoint's train-state arrays on this process's first device, whatever mesh wrote
    them (inspection, tests, comparing runs)."""
    path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return ckptr.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta))
