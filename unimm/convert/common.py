"""Reading PyTorch-layout state dicts safely and checking them against a model.

A state dict here is a flat ``{name: np.ndarray}`` in the PyTorch layout (Linear weight
``[out, in]``, Conv2d weight ``[O, I, kh, kw]``). Loading never executes code:
safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any
from collections.abc import Iterable, Mapping

import numpy as np


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the configured architecture."""


def load_torch_file(path: str, key: str | None = None) -> dict[str, np.ndarray]:
    """Loads a ``.pth``/``.ckpt`` with ``torch.load(weights_only=True)``; ``key`` picks a sub-dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .pth/.ckpt files needs PyTorch: pip install 'unimm[torch]'") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatchError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointMismatchError(f"{path}: expected the weights under key {key!r}, found {found}")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not hasattr(v, "detach"):
            raise CheckpointMismatchError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to(dtype=torch.float32).numpy() if v.is_floating_point() else v.numpy()
    return out


def save_torch_file(state: Mapping[str, np.ndarray], path: str) -> None:
    import torch
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


def load_safetensors_dir(path: str) -> dict[str, np.ndarray]:
    """All tensors of a folder's ``*.safetensors`` (sharded or not), as float32/int numpy."""
    from safetensors.numpy import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            wanted = sorted(set(json.load(f)["weight_map"].values()))
        missing = [w for w in wanted if not os.path.exists(os.path.join(path, w))]
        if missing:
            raise FileNotFoundError(f"{path}: shards named in the index are missing: {missing}")
        files = [os.path.join(path, w) for w in wanted]
    out: dict[str, np.ndarray] = {}
    for fname in files:
        try:
            tensors = load_file(fname)
        except Exception as e:
            raise CheckpointMismatchError(f"{fname}: not a readable safetensors file ({e})") from e
        for k, v in tensors.items():
            out[k] = v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
    return out


def check_state_dict(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                     ignored: Iterable[str] = (), source: str = "checkpoint") -> None:
    """Raises one error naming every missing, unexpected and mis-shaped key."""
    ignored = set(ignored)
    missing = sorted(k for k in expected if k not in state)
    extra = sorted(k for k in state if k not in expected and k not in ignored)
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    if shapes:
        problems.append(f"shape mismatches [{'; '.join(shapes)}]")
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit the configured model: " + "; ".join(problems))


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {prefix + k: v for k, v in state.items()}


# Layout helpers shared by every component's mapping.
def linear_to_torch(p: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    out = {f"{name}.weight": np.asarray(p["kernel"]).T}
    if "bias" in p:
        out[f"{name}.bias"] = np.asarray(p["bias"])
    return out


def linear_from_torch(sd: Mapping[str, np.ndarray], name: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": np.asarray(sd[f"{name}.weight"]).T}
    if bias:
        out["bias"] = np.asarray(sd[f"{name}.bias"])
    return out


def norm_to_torch(p: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    out = {f"{name}.weight": np.asarray(p["scale"])}
    if "bias" in p:
        out[f"{name}.bias"] = np.asarray(p["bias"])
    return out


def norm_from_torch(sd: Mapping[str, np.ndarray], name: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"scale": np.asarray(sd[f"{name}.weight"])}
    if bias:
        out["bias"] = np.asarray(sd[f"{name}.bias"])
    return out


def conv_to_torch(p: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": np.asarray(p["kernel"]).transpose(3, 2, 0, 1),
            f"{name}.bias": np.asarray(p["bias"])}


def conv_from_torch(sd: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"kernel": np.asarray(sd[f"{name}.weight"]).transpose(2, 3, 1, 0),
            "bias": np.asarray(sd[f"{name}.bias"])}


def shapes_of(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def zero_views(abstract: Any) -> Any:
    """Zero-stride numpy views shaped like an abstract params tree: layout maps run on
    them to derive expected names and shapes without allocating."""
    import jax

    return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)


# Generic nnx-tree <-> torch-name mapping (``kernel`` leaves are Linears, ``scale`` norms).
def _torch_name(key: Any) -> str:
    # `mlp_0` -> `mlp.0`: attribute names standing in for nn.Sequential indices.
    name = str(key)
    head, _, tail = name.rpartition("_")
    return f"{head}.{tail}" if head and tail.isdigit() else name


def tree_to_torch(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Pure params dict -> flat PyTorch-layout state dict (Linear ``kernel`` transposed)."""
    out: dict[str, np.ndarray] = {}
    for key, val in tree.items():
        name = prefix + _torch_name(key)
        if isinstance(val, Mapping) and "kernel" in val:
            out.update(linear_to_torch(val, name))
        elif isinstance(val, Mapping) and "scale" in val:
            out.update(norm_to_torch(val, name))
        elif isinstance(val, Mapping):
            out.update(tree_to_torch(val, name + "."))
        else:
            out[name] = np.asarray(val)
    return out


def tree_from_torch(state: Mapping[str, np.ndarray], abstract: Mapping[Any, Any], prefix: str = "") -> dict:
    """Inverse of :func:`tree_to_torch` guided by the abstract params tree (dtypes cast)."""
    out: dict[Any, Any] = {}
    for key, val in abstract.items():
        name = prefix + _torch_name(key)
        if isinstance(val, Mapping) and "kernel" in val:
            sub = linear_from_torch(state, name, bias="bias" in val)
        elif isinstance(val, Mapping) and "scale" in val:
            sub = norm_from_torch(state, name, bias="bias" in val)
        elif isinstance(val, Mapping):
            out[key] = tree_from_torch(state, val, name + ".")
            continue
        else:
            out[key] = np.asarray(state[name], val.dtype)
            continue
        out[key] = {k: np.asarray(v, val[k].dtype) for k, v in sub.items()}
    return out


def expected_torch_shapes(abstract: Mapping[Any, Any]) -> dict[str, tuple[int, ...]]:
    """Torch-layout shapes of an abstract params tree, allocating nothing (zero-stride views)."""
    views = zero_views(abstract)
    return {k: tuple(v.shape) for k, v in tree_to_torch(views).items()}
