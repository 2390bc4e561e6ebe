"""Shared building blocks and the module <-> pure-function bridge.

Convention (DESIGN.md §3): components are ``flax.nnx`` modules whose constructor is
``Module(cfg, *, rngs)``; the public compute is pure functions of a *params pytree* — the
nested dict ``nnx.to_pure_dict(nnx.state(module, nnx.Param))`` — rebuilt into a module
with :func:`bind` inside traced code. Every parameter carries logical axis names.
"""
from __future__ import annotations

import functools
from typing import Any
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

# Parameters are created unsharded and placed by jit(out_shardings=...) from their
# logical names (big_vision style), so flax's eager sharding is switched off.
nnx.use_eager_sharding(False)

xavier_uniform = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


# jax.nn.dot_product_attention's implementations by config name ("auto": JAX picks per
# backend, e.g. cuDNN's fused kernel on GPUs that support the shapes, XLA elsewhere), and
# "splash": the TPU splash kernel (unimm.models.splash) where a layer attends over its own
# sequence (training, prefill without a cache), XLA elsewhere.
ATTENTION = {"xla": "xla", "cudnn": "cudnn", "auto": None, "splash": "splash"}


def attention_impl(name: str, field: str) -> str | None:
    """The ``implementation=`` argument for an attention config value; ValueError naming
    ``field`` otherwise."""
    if name not in ATTENTION:
        raise ValueError(f"{field}={name!r}: expected one of {tuple(ATTENTION)}")
    return ATTENTION[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str | None,
              *, valid: jax.Array | None = None, causal: bool = False) -> jax.Array:
    """``jax.nn.dot_product_attention`` over ``[B, T, N, D]`` with the dense ``mask``, or the
    splash kernel over the static mask (``causal``) and the valid slots ``valid [B, T]``. A
    call with no ``valid`` (e.g. a cache's keys) takes XLA's path under "splash"."""
    if implementation == "splash" and valid is not None:
        from unimm.models import splash
        return splash.attention(q, k, v, valid, causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                        implementation="xla" if implementation == "splash" else implementation)


def normal(std: float = 0.02):
    return nnx.initializers.normal(std)


def linear(din: int, dout: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
           use_bias: bool = True, kernel_init=xavier_uniform, bias_init=zeros,
           dtype=None) -> nnx.Linear:
    """``nnx.Linear`` with logical axis names on kernel ``(din, dout)`` and bias ``(dout,)``."""
    return nnx.Linear(
        din, dout, use_bias=use_bias, dtype=dtype,
        kernel_init=nnx.with_partitioning(kernel_init, axes),
        bias_init=nnx.with_partitioning(bias_init, (axes[1],)),
        rngs=rngs)


def layer_norm(dim: int, axis: str | None = "norm", *, rngs: nnx.Rngs, eps: float = 1e-6,
               affine: bool = True, dtype=None) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim, epsilon=eps, use_bias=affine, use_scale=affine, dtype=dtype,
        scale_init=nnx.with_partitioning(ones, (axis,)),
        bias_init=nnx.with_partitioning(zeros, (axis,)),
        rngs=rngs)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: tuple[str | None, ...],
          dtype=jnp.float32) -> nnx.Param:
    """A free parameter (embedding table, position embedding, mask token, ...)."""
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), tuple(shape), dtype))


def freeze(cfg: Any) -> Any:
    """A hashable view of a config, used as a cache key for the module structure."""
    if isinstance(cfg, ml_collections.FrozenConfigDict):
        return cfg
    if isinstance(cfg, ml_collections.ConfigDict):
        return ml_collections.FrozenConfigDict(cfg)
    return cfg


@functools.lru_cache(maxsize=64)
def _split_abstract(cls: type, cfg: Any):
    # jax.eval_shape rather than nnx.eval_shape: the latter turns the logical names into
    # NamedShardings on whatever mesh is in context (jax.set_mesh), which they are not.
    return jax.eval_shape(lambda: nnx.split(cls(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def abstract_params(cls: type, cfg: Any) -> Any:
    """ShapeDtypeStruct tree of the params, allocating nothing."""
    _, state = _split_abstract(cls, freeze(cfg))
    return nnx.to_pure_dict(state)


def logical_specs(cls: type, cfg: Any) -> Any:
    """Tree of logical ``PartitionSpec``s, same structure as the params."""
    _, state = _split_abstract(cls, freeze(cfg))
    return nnx.to_pure_dict(nnx.get_partition_spec(state))


def init_params(cls: type, cfg: Any, rng: jax.Array) -> Any:
    """Creates fresh params (a pure nested dict). Wrap in jit(out_shardings=...) to shard."""
    return nnx.to_pure_dict(nnx.state(cls(freeze(cfg), rngs=nnx.Rngs(params=rng)), nnx.Param))


def bind(cls: type, cfg: Any, params: Any) -> nnx.Module:
    """Rebuilds the module from ``params``; cheap inside jit (structure is cached)."""
    graphdef, _ = _split_abstract(cls, freeze(cfg))
    return nnx.merge(graphdef, params)


def param_count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def count_by(fn: Callable[[], Any]) -> int:
    """Parameter count of the pytree returned by ``fn`` computed abstractly."""
    return param_count(jax.eval_shape(fn))


def shard_batch(x: jax.Array) -> jax.Array:
    """Pins the leading (batch) dim of an activation to the data-parallel mesh axes.

    Active only under ``jax.set_mesh(mesh)`` with unimm's axis names; a no-op otherwise.
    Placed at every transformer-block boundary (MaxText's activation constraints): without
    it XLA's sharding propagation may pick layouts that are slow or, as observed on CPU
    for the MAR decoder, wrong.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    if not axes or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))
