"""Loading ``configs/*.py:variant`` files outside absl (converter CLI, benchmarks, tests)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"configs/harmon.py:tiny"`` -> ``get_config("tiny")``; relative paths fall back to the repo."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {spec.partition(':')[0]}")
    module_spec = importlib.util.spec_from_file_location(
        "unimm_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
