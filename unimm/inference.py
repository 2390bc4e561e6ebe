"""Loading a trained model from a workdir for the ``sample`` / ``caption`` / ``evaluate`` CLIs."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import ml_collections

from unimm import checkpoint, config_utils, sharding
from unimm.eval import shapes_bench
from unimm.train import loop
from unimm.train.state import create_train_state

CONFIG_FILE = "config.json"


def save_config(config: Any, workdir: str) -> None:
    """The run's config beside its checkpoints, so the CLIs rebuild the same model."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str, spec: str | None = None) -> ml_collections.ConfigDict:
    """``spec`` (``configs/x.py:variant``) if given, else the run's saved ``config.json``."""
    if spec:
        return config_utils.load_config(spec)
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass --config=configs/harmon.py:<variant>")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    return _tuples(ml_collections.ConfigDict(raw))


def _tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    # JSON turns tuples into lists; the sharding rules and VAE dims are tuples in configs.
    config.sharding.logical_axis_rules = tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding.logical_axis_rules)
    for key in ("ch_mult", "attn_resolutions"):
        config.model.vae[key] = tuple(config.model.vae[key])
    return config


def load_model(config: Any, workdir: str, use_ema: bool = True) -> tuple[shapes_bench.Model, int]:
    """The newest checkpoint's (EMA) params as a :class:`shapes_bench.Model`, and its step."""
    tok = loop.make_tokenizer(config)
    loop.set_derived_fields(config, tok)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state = create_train_state(config, mesh, jax.random.key(config.seed))
    manager = checkpoint.make_manager(workdir, keep=max(int(config.train.keep_checkpoints), 1))
    arrays, step = checkpoint.restore_arrays(manager, state)
    params = arrays["ema_params" if use_ema else "params"]
    return shapes_bench.Model(config, tok, params, state.tokenizer_params), step


def load_or_exit(workdir: str, spec: str | None = None, sample_overrides: dict | None = None):
    """For the CLIs: ``(config, model, step)``, or exit with one ``error:`` line (no traceback)."""
    try:
        config = load_config(workdir, spec)
        for key, value in (sample_overrides or {}).items():
            if value is not None:
                config.sample[key] = value
        model, step = load_model(config, workdir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return config, model, step
