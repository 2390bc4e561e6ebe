"""On 8 fake CPU devices, a (data 2, fsdp 2, tensor 2) mesh gives the single-device outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import config_utils, sharding
from unimm.models import gaussian_diffusion, harmon, layers, mar, qwen2


@pytest.fixture(scope="module")
def setup():
    config = config_utils.load_config("configs/harmon.py:tiny")
    cfg = config.model
    b, seq = 4, cfg.mar.grid ** 2
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (b, seq, cfg.mar.token_dim))
    keep = mar.max_visible_for_training(seq, cfg.mar.mask_ratio_min)
    mask, idx, valid, _ = mar.training_mask(keys[1], b, seq, cfg.mar.mask_ratio_min, seq - keep)
    text = jax.random.randint(keys[2], (b, 6), 0, cfg.llm.vocab_size)
    batch = dict(x=x, idx=idx, valid=valid, text=text, mask=mask.astype(jnp.float32))
    return config, batch, keys[3]


def outputs(params, cfg, batch, rng):
    embeds = qwen2.embed(params["llm"], cfg.llm, batch["text"])
    text_mask = jnp.ones(batch["text"].shape, bool)
    z = harmon.decoder_condition(params, cfg, embeds, text_mask, batch["x"], batch["idx"], batch["valid"])
    loss = gaussian_diffusion.diffusion_loss(
        params["head"], harmon.head_config(cfg), cfg.diffusion,
        batch["x"].reshape(-1, cfg.mar.token_dim), z.reshape(-1, z.shape[-1]), batch["mask"].reshape(-1), rng)
    logits = qwen2.logits(params["llm"], cfg.llm, batch["text"])
    return z, loss, logits


def test_sharded_outputs_match_single_device(setup):
    config, batch, rng = setup
    cfg = layers.freeze(config.model)   # hashable: a static jit argument
    init = lambda r: harmon.init(cfg, r)
    single = jax.jit(harmon.init, static_argnums=0)(cfg, jax.random.key(0))   # other tests' program: cached
    want = jax.jit(outputs, static_argnums=1)(single, cfg, batch, rng)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.param_shardings(harmon.abstract_params(cfg), harmon.logical_specs(cfg), mesh,
                                         config.sharding.logical_axis_rules)
    params = jax.jit(init, out_shardings=shardings)(jax.random.key(0))   # born sharded
    in_batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    with jax.set_mesh(mesh):   # activates the activation-sharding constraints
        got = jax.jit(outputs, static_argnums=1)(params, cfg, in_batch, rng)

    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)

    # Parameters are really split: device 0 holds a fraction of the bytes.
    total = sum(x.nbytes for x in jax.tree.leaves(single))
    on_dev0 = sum(s.data.nbytes for x in jax.tree.leaves(params)
                  for s in x.addressable_shards if s.device == mesh.devices.flat[0])
    assert on_dev0 < 0.5 * total, (on_dev0, total)
    emb = params["llm"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_indivisible_axes_are_dropped():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.logical_to_spec(("vocab", "embed"), (7, 64), mesh, {"vocab": "tensor", "embed": "fsdp"})
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
