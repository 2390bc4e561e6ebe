"""Device mesh creation and logical-axis -> mesh-axis resolution.

Every parameter carries logical axis names (``nnx.with_partitioning``); the config's
``sharding.logical_axis_rules`` table maps them onto the mesh axes ``data``, ``fsdp`` and
``tensor`` (MaxText style). A mesh axis that does not divide a dimension is dropped for
that dimension, so tiny configs shard on any mesh without special cases.
"""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Activations: the batch dimension is split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_shape: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, tensor)`` mesh; one entry may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = {k: 1 for k in MESH_AXES}
    for k, v in dict(mesh_shape or {"data": -1}).items():
        if k not in shape:
            raise ValueError(f"sharding.mesh: unknown mesh axis {k!r}; expected one of {MESH_AXES}")
        shape[k] = int(v)
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"sharding.mesh: at most one axis may be -1, got {free}")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"sharding.mesh: {len(devices)} devices are not divisible by the fixed axes {shape}")
        shape[free[0]] = len(devices) // fixed
    if math.prod(shape.values()) != len(devices):
        raise ValueError(
            f"sharding.mesh: shape {shape} needs {math.prod(shape.values())} devices, "
            f"but {len(devices)} are available")
    arr = np.asarray(devices).reshape([shape[k] for k in MESH_AXES])
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(logical: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in rules:
        raise ValueError(f"sharding.logical_axis_rules: no entry for the logical axis {logical!r}; "
                         f"add one, e.g. ({logical!r}, None) to replicate it")
    target = rules[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(logical_spec: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any]) -> P:
    """Resolves one parameter's logical names to a mesh ``PartitionSpec`` for ``shape``."""
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))):
        axes = []
        size = 1
        for ax in _mesh_axes_for(name, rules):
            n = mesh.shape[ax]
            if ax in used or n == 1 or dim % (size * n):
                continue
            axes.append(ax)
            size *= n
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def rules_dict(rules: Any) -> dict[str, Any]:
    """Accepts the config's rules as a mapping or as ((logical, mesh_axes), ...) pairs, where
    mesh_axes is None, one mesh axis or a tuple of them; anything else is a ValueError."""
    pairs = list(rules.items()) if isinstance(rules, Mapping) else rules
    out = {}
    for entry in pairs if isinstance(pairs, (list, tuple)) else [pairs]:
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
        axes = entry[1] if ok else None
        axes = (axes,) if isinstance(axes, str) else () if axes is None else axes
        if not ok or not isinstance(axes, (list, tuple)) or any(a not in MESH_AXES for a in axes):
            shown = repr(entry) if len(repr(entry)) <= 80 else repr(entry)[:77] + "..."
            raise ValueError(f"sharding.logical_axis_rules: entry {shown} is not a (logical axis, mesh "
                             f"axes) pair; expected e.g. ('embed', 'fsdp') with mesh axes None or from "
                             f"{MESH_AXES}")
        out[entry[0]] = entry[1]
    return out


def param_shardings(abstract_params: Any, logical_specs: Any, mesh: Mesh, rules: Any) -> Any:
    """Tree of ``NamedSharding`` matching ``abstract_params`` (ShapeDtypeStructs or arrays)."""
    rules = rules_dict(rules)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_spec(tuple(spec), x.shape, mesh, rules)),
        logical_specs, abstract_params, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for an input whose leading dimension is the (global) batch."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
