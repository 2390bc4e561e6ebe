"""Loading a trained model from a workdir for the ``sample`` / ``caption`` / ``evaluate`` CLIs.

The steps are separate so that the CLIs check what the user gave (workdir, config.json,
prompts, checkpoint) before the expensive ones: :func:`load_config` (the run's
``config.json``), :func:`prepare` (tokenizer, derived fields), :func:`load_model` (checks
the newest checkpoint fits the config, then builds and restores the model).
"""
from __future__ import annotations

import os
import re
from typing import Any

import ml_collections

from unimm import cli, config_utils, schema

CONFIG_FILE = "config.json"


def save_config(config: Any, workdir: str) -> None:
    """The run's config beside its checkpoints, so the CLIs rebuild the same model."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
    """A training workdir must exist (the CLIs never create one); errors name ``flag``."""
    if not workdir:
        raise ValueError(f"{flag} is empty: expected a training workdir (config.json + checkpoints/)")
    if not os.path.exists(workdir):
        raise FileNotFoundError(f"{flag}={workdir} does not exist: expected a training workdir "
                                "(config.json + checkpoints/ written by python -m unimm.main)")
    if not os.path.isdir(workdir):
        raise NotADirectoryError(f"{flag}={workdir} is not a directory: expected a training workdir")


def load_config(workdir: str, spec: str | None = None, flag: str = "--workdir") -> ml_collections.ConfigDict:
    """``spec`` (``configs/x.py:variant``) if given, else the run's saved ``config.json``."""
    check_workdir(workdir, flag)
    if spec:
        return config_utils.load_config(spec)
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass --config=configs/harmon.py:<variant>")
    raw = config_utils.read_json_object(path, "config", "the config.json written by python -m unimm.main, "
                                        "or pass --config=configs/harmon.py:<variant>", "the run's config")
    try:
        return _tuples(ml_collections.ConfigDict(raw))
    except (AttributeError, KeyError) as e:
        named = re.search(r"'([\w.]+)'", str(e))
        field = named.group(1) if named else cli.one_line(e)
        raise ValueError(f"{path}: a required config field is missing ({field}); expected the "
                         "config.json written by python -m unimm.main") from None


def _tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    # JSON turns tuples into lists; the sharding rules and VAE dims are tuples in configs.
    config.sharding.logical_axis_rules = tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding.logical_axis_rules)
    for key in ("ch_mult", "attn_resolutions"):
        config.model.vae[key] = tuple(config.model.vae[key])
    # Fields added since older runs wrote their config.json get the schema's defaults: the
    # behaviour those runs had.
    return schema.backfill(config)


def prepare(config: Any):
    """``(resolved config, tokenizer)``: a frozen copy of ``config`` with the fields that
    follow from its tokenizer and resolution set (``unimm.resolve.resolve``)."""
    from unimm import resolve   # jax: not before the CLIs have checked their input

    tok = resolve.make_tokenizer(config)
    return resolve.resolve(config, tok, check=False), tok


def latest_step(config: Any, workdir: str, flag: str = "--workdir") -> int:
    """The newest checkpoint step in ``workdir``; errors name the directory when there is none
    or when its params do not fit ``config``'s model (checked without building the model)."""
    from unimm import checkpoint
    from unimm.models import harmon

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {flag}={workdir}: expected {directory} "
                                "written by python -m unimm.main")
    manager = checkpoint.make_manager(workdir, keep=1)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    checkpoint.check_params_fit(manager, step, harmon.abstract_params(config.model))
    return int(step)


def load_model(config: Any, workdir: str, use_ema: bool = True, tok: Any = None):
    """The newest checkpoint's (EMA) params as a :class:`unimm.inference.model.Model`, and its step."""
    import jax   # jax and the model: not before the CLIs have checked their input

    from unimm import checkpoint, resolve, sharding
    from unimm.inference.model import Model
    from unimm.train.state import create_train_state

    tok = resolve.make_tokenizer(config) if tok is None else tok
    config = resolve.resolve(config, tok, check=False)
    latest_step(config, workdir)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state = create_train_state(config, mesh, jax.random.key(config.seed))
    manager = checkpoint.make_manager(workdir, keep=max(int(config.train.keep_checkpoints), 1))
    arrays, step = checkpoint.restore_arrays(manager, state)
    params = arrays["ema_params" if use_ema else "params"]
    return Model(config, tok, params, state.tokenizer_params), step


def apply_sample_overrides(config: Any, sample_overrides: dict | None) -> None:
    for key, value in (sample_overrides or {}).items():
        if value is not None:
            config.sample[key] = value


def load_or_exit(workdir: str, spec: str | None = None, sample_overrides: dict | None = None):
    """For the CLIs: ``(config, model, step)``, or exit with one ``error:`` line (no traceback)."""
    with cli.user_errors():
        config = load_config(workdir, spec)
        apply_sample_overrides(config, sample_overrides)
        model, step = load_model(config, workdir)
    return model.config, model, step
