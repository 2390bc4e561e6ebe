"""Loading ``configs/*.py:variant`` files outside absl (converter CLI, benchmarks, tests)."""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_json_object(path: str, what: str, expected: str = "", holds: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not UTF-8 JSON, or not an object, is one
    ValueError naming the file and ``what`` it should be (``expected`` adds a hint, ``holds``
    names what the object is, default ``what``)."""
    hint = f"; expected {expected}" if expected else ""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON {what} ({e}){hint}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object ({holds or what}), found {type(raw).__name__}")
    return raw


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"configs/harmon.py:tiny"`` -> ``get_config("tiny")``; relative paths fall back to the repo."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
        path = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {spec.partition(':')[0]}")
    return load_module(path).get_config(arg or None)


def load_module(path: str) -> Any:
    """The config file ``path`` as a module (its tables and ``get_config``)."""
    module_spec = importlib.util.spec_from_file_location(
        "unimm_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_variant(arg: str | None, where: str, sizes, recipes, default: str) -> tuple[str, list[str]]:
    """``"tiny,decoder"`` -> ``("tiny", ["decoder"])``: a config file's argument is a size
    (one of ``sizes``), then any recipes (of ``recipes``), comma-separated; ``None`` or ``""``
    is ``default``. Unknown names are one ValueError listing the choices."""
    size, *names = [part.strip().lower() for part in (arg or default).split(",")]
    if size not in sizes:
        raise ValueError(f"{where}: unknown variant {size!r}; choose one of {tuple(sizes)}")
    for name in names:
        if name not in recipes:
            raise ValueError(f"{where}: unknown recipe {name!r}; choose one of {tuple(recipes)}")
    return size, names


def apply_table(config: ml_collections.ConfigDict, table: dict[str, Any], what: str) -> None:
    """Sets each ``"section.field": value`` of a size or recipe table; every field must exist
    already (a table cannot add fields, so a misspelt name fails here)."""
    for path, value in table.items():
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"{what} sets {path}, which is not a config field")
        with config.unlocked():
            node[leaf] = value


def sibling(config_file: str, name: str) -> Any:
    """``sibling(__file__, "harmon.py")``: another config file in the same folder as
    ``config_file``, as a module (config files extend each other from any working directory)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """``"model.llm.remat=full"``: sets an existing field, parsing the value as that field's
    type (Python literals for tuples / dicts via ``ast.literal_eval``, never ``eval``)."""
    import ast
    path, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r}: expected FIELD=VALUE")
    *parents, leaf = path.split(".")
    node = config
    for name in parents:
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise ValueError(f"override {item!r}: {path} is not a config field")
        node = node[name]
    if leaf not in node:
        raise ValueError(f"override {item!r}: {path} is not a config field")
    old = node[leaf]
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value = raw.lower() in ("true", "1")
        elif isinstance(old, (int, float)):
            value = type(old)(raw)
        elif isinstance(old, str):
            value = raw
        else:
            value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"override {item!r}: {raw!r} is not a valid {type(old).__name__} for {path}") from None
    with config.unlocked():
        node[leaf] = value
