"""Ahead-of-time compilation and per-device memory of a train step, from abstract shapes.

    python -m unimm.memory --config=configs/harmon.py:1.5b --mesh=data=1,fsdp=8 --batch=64
    python -m unimm.memory --config=configs/grpo.py:0.5b --mesh=fsdp=4,tensor=2 --devices=8

No weights are allocated: params, optimizer state and batch are ``ShapeDtypeStruct``s with
their shardings, the step is lowered and compiled for the mesh, and XLA's memory analysis
of the compiled program gives the bytes each device needs (arguments, outputs, temporaries;
donated state aliases its outputs). ``--devices N`` fakes N host devices when the machine
has fewer (set before JAX starts).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

GIB = 1024 ** 3


def _fake_devices(n: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if n and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def abstract_train_state(config: Any, mesh: Any) -> Any:
    """The :class:`TrainState` of ``config`` as sharded ``ShapeDtypeStruct``s (nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from unimm import sharding
    from unimm.models import harmon, layers
    from unimm.models import vae as vae_lib
    from unimm.train.optimizer import make_optimizer
    from unimm.train.state import TrainState, frozen_groups, opt_state_shardings, param_shardings

    m = layers.freeze(config.model)
    tx, _ = make_optimizer(config.optimizer, config.train.steps, frozen_groups(config))
    p_shard = param_shardings(config, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          harmon.abstract_params(m), p_shard)
    rep = sharding.replicated(mesh)
    opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, p_shard, mesh))
    tok = jax.eval_shape(lambda r: vae_lib.init(m.vae, r), jax.random.key(0))
    tok = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), tok)
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
                      opt_state=opt_state, ema_params=params, tokenizer_params=tok, tx=tx)


def supervised_batch(config: Any, latents: bool = False) -> dict:
    """Shapes of one supervised batch (DESIGN.md §4 lengths): images at ``data.image_size``
    through the frozen VAE, or (``latents``) pre-computed tokens, as MAR's cached latents."""
    import jax
    import numpy as np
    from unimm.models import vae as vae_lib
    d, s, m = config.data, config.data.image_size, config.model
    b1, b2 = d.i2t_batch_size, d.t2i_batch_size
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, np.dtype(dt))
    h, w = vae_lib.grid(m.vae, s)
    image = lambda b: ({"latents": sds((b, h * w, m.mar.token_dim), "float32")} if latents
                       else {"images": sds((b, s, s, 3), "float32")})
    t1 = max(112, d.num_image_tokens + 16)
    batch = {"i2t_tokens": sds((b1, t1), "int32"), "i2t_targets": sds((b1, t1), "int32"),
             "i2t_mask": sds((b1, t1), "int32"), "t2i_tokens": sds((b2, 32), "int32"),
             "t2i_mask": sds((b2, 32), "int32")}
    for task, b in (("i2t", b1), ("t2i", b2)):
        batch.update({f"{task}_{k}": v for k, v in image(b).items()})
    return batch


def grpo_rollout(config: Any, batch: int) -> dict:
    """Shapes of one scored caption rollout of ``batch`` rows (prompt 32 + completion)."""
    import jax
    import numpy as np
    from unimm.models import vae as vae_lib
    g, m = config.grpo, config.model
    h, w = vae_lib.grid(m.vae, config.data.image_size)
    t = config.data.num_image_tokens + 32 + g.captioner.max_new_tokens
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, np.dtype(dt))
    return {"tokens": sds((batch, t), "int32"), "mask": sds((batch, t), "bool"),
            "completion_mask": sds((batch, t), "bool"),
            "image_tokens": sds((batch, h * w, m.mar.token_dim), "float32"),
            "old_log_probs": sds((batch, t), "float32"), "ref_log_probs": sds((batch, t), "float32"),
            "advantages": sds((batch,), "float32"), "group_valid": sds((batch,), "bool")}


def state_bytes_per_device(state: Any) -> int:
    """Bytes of params + optimizer state + EMA on the most loaded device (from shardings)."""
    import jax
    import numpy as np
    total = 0
    for leaf in jax.tree.leaves((state.params, state.opt_state, state.ema_params)):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * leaf.dtype.itemsize
    return total


def compile_step(config: Any, mesh: Any, batch: int, latents: bool = False) -> dict:
    """Lowers and compiles the config's train step (GRPO's when it has a ``grpo`` section)."""
    import jax

    from unimm import resolve
    from unimm.models import vae as vae_lib
    from unimm.train.state import state_shardings

    config = resolve.thaw(config)   # a copy: the caller's stays as it is
    config.data.image_token_id = 5
    if "grpo" not in config:
        config.data.i2t_batch_size = config.data.t2i_batch_size = batch // 2
    resolve.check_batch_sizes(config, mesh)
    h, w = vae_lib.grid(config.model.vae, config.data.image_size)
    config.data.num_image_tokens = h * w + config.model.mar.buffer_size
    state = abstract_train_state(config, mesh)
    if "grpo" in config:
        from unimm.train.grpo import jit_grpo_step
        example = grpo_rollout(config, batch)
        step = jit_grpo_step(config, mesh, state_shardings(state), example)
    else:
        from unimm.train.step import jit_train_step
        example = supervised_batch(config, latents)
        step = jit_train_step(config, mesh, state_shardings(state), example)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step.lower(state, example, jax.random.key(0)).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return dict(compile_seconds=seconds, argument_bytes=mem.argument_size_in_bytes,
                output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                temp_bytes=mem.temp_size_in_bytes, peak_bytes=peak, state_bytes=state_bytes_per_device(state))


def parse_mesh(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if name not in ("data", "fsdp", "tensor") or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh={text!r}: expected comma-separated data=N,fsdp=N,tensor=N")
        out[name] = int(size)
    return {"data": 1, "fsdp": 1, "tensor": 1, **out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unimm.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/<file>.py:<variant>")
    p.add_argument("--mesh", default="fsdp=-1", help="mesh axis sizes, e.g. data=2,fsdp=4,tensor=1")
    p.add_argument("--batch", type=int, default=64, help="global batch (split evenly between tasks)")
    p.add_argument("--devices", type=int, default=8, help="fake this many host devices if needed")
    p.add_argument("--latents", action="store_true", help="batches of pre-computed tokens (no VAE in the step)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, e.g. --set model.llm.remat=full (repeatable)")
    args = p.parse_args(argv)
    _fake_devices(args.devices)
    from unimm import config_utils, sharding

    config = config_utils.load_config(args.config)
    for item in args.set:
        config_utils.apply_override(config, item)
    mesh = sharding.make_mesh(parse_mesh(args.mesh))
    r = compile_step(config, mesh, args.batch, args.latents)
    print(f"{args.config} mesh {dict(mesh.shape)} global batch {args.batch}: compiled in "
          f"{r['compile_seconds']:.1f} s")
    import jax
    single = state_bytes_per_device(abstract_train_state(config, sharding.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])))
    n = mesh.size
    print(f"  params+opt+EMA: {single / GIB:.2f} GiB on one device, {r['state_bytes'] / GIB:.3f} GiB per "
          f"device on this mesh = {n * r['state_bytes'] / single:.3f}/{n} of it (target <= 1.1/{n})")
    print(f"  per device: params+opt+EMA {r['state_bytes'] / GIB:.2f} GiB, arguments "
          f"{r['argument_bytes'] / GIB:.2f} GiB, temporaries {r['temp_bytes'] / GIB:.2f} GiB, "
          f"peak {r['peak_bytes'] / GIB:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
