"""The train state (params, optimizer state, EMA params, step), created already sharded."""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from unimm import sharding
from unimm.data import pipeline
from unimm.models import harmon, layers
from unimm.models import vae as vae_lib
from unimm.train.optimizer import make_optimizer

# Param groups each training stage leaves untouched (Harmon paper: stage I freezes the LLM).
FROZEN_BY_STAGE = {1: ("llm",), 2: (), 3: ()}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    tokenizer_params: Any          # the frozen VAE ({} for the pixel-patch tokenizer)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


PARAM_GROUPS = ("llm", "mar", "head", "proj_in", "proj_out", "readout")


def frozen_groups(config: Any) -> tuple[str, ...]:
    """Groups the optimizer leaves alone: GRPO's non-``grpo.trainable`` ones, else the stage's."""
    if "grpo" in config:
        unknown = set(config.grpo.trainable) - set(PARAM_GROUPS)
        if unknown:
            raise ValueError(f"grpo.trainable has unknown groups {sorted(unknown)}; choose from {PARAM_GROUPS}")
        return tuple(k for k in PARAM_GROUPS if k not in config.grpo.trainable)
    stage = int(config.train.stage)
    if stage not in FROZEN_BY_STAGE:
        raise ValueError(f"train.stage={stage}: expected one of {sorted(FROZEN_BY_STAGE)}")
    return FROZEN_BY_STAGE[stage]


def param_shardings(config: Any, mesh: jax.sharding.Mesh) -> Any:
    m = config.model
    return sharding.param_shardings(harmon.abstract_params(m), harmon.logical_specs(m), mesh,
                                    config.sharding.logical_axis_rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, p_shard: Any,
                        mesh: jax.sharding.Mesh) -> Any:
    """Shardings of ``tx.init(params)``: every params-shaped tree (AdamW's mu / nu) takes the
    params' shardings, everything else (step counts) is replicated. jit propagation cannot
    give this: the moments are zeros, which depend on no sharded input."""
    rep = sharding.replicated(mesh)
    state = jax.eval_shape(tx.init, abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)   # frozen groups hold no state
    return optax.tree_utils.tree_map_params(tx, lambda x, s: x if masked(x) else s, state, p_shard,
                                            transform_non_params=lambda _: rep, is_leaf=masked)


def initial_tokenizer_params(config: Any, rng: jax.Array) -> Any:
    """The tokenizer's params at every start of a run: the patch code fitted to the run's
    training images (``model.vae.code_dim``), else the tokenizer's init (``{}`` for pixels)."""
    m = layers.freeze(config.model)
    if vae_lib.has_patch_code(m.vae):
        return vae_lib.fit_patch_code(m.vae, pipeline.fit_images(config))
    return jax.jit(lambda r: vae_lib.init(m.vae, r))(rng)


def create_train_state(config: Any, mesh: jax.sharding.Mesh, rng: jax.Array,
                       params: Any = None, tokenizer_params: Any = None,
                       frozen: tuple[str, ...] | None = None) -> TrainState:
    """A fresh state with params born sharded (``params``/``tokenizer_params`` override init).
    ``frozen``: top-level param groups the optimizer leaves alone (default: the stage's).

    The optimizer moments and the EMA take the params' shardings (:func:`opt_state_shardings`).
    """
    m = layers.freeze(config.model)
    frozen = frozen_groups(config) if frozen is None else tuple(frozen)
    tx, _ = make_optimizer(config.optimizer, config.train.steps, frozen)
    p_shard = param_shardings(config, mesh)
    k_model, k_vae = jax.random.split(rng)
    if params is None:
        params = jax.jit(lambda r: harmon.init(m, r), out_shardings=p_shard)(k_model)
    else:
        params = jax.device_put(params, p_shard)
    if tokenizer_params is None:
        tokenizer_params = initial_tokenizer_params(config, k_vae)
    tokenizer_params = jax.device_put(tokenizer_params, sharding.replicated(mesh))

    o_shard = opt_state_shardings(tx, params, p_shard, mesh)

    @functools.partial(jax.jit, out_shardings=(o_shard, p_shard))
    def finish(params):
        return tx.init(params), jax.tree.map(jnp.copy, params)

    opt_state, ema = finish(params)
    rep = sharding.replicated(mesh)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                      opt_state=opt_state, ema_params=ema, tokenizer_params=tokenizer_params, tx=tx)


def state_shardings(state: TrainState) -> Any:
    """The shardings of a concrete state's arrays (used as jit in/out shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)
