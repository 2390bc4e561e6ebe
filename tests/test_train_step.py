"""The supervised train step on synthetic batches: losses, stages, gradient scale, sharding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm import config_utils, resolve, sharding
from unimm.models import harmon, harmon_sample, layers
from unimm.data import text
from unimm.train import step as step_lib
from unimm.train.state import create_train_state, state_shardings, initial_tokenizer_params

from tiny import one_block_each   # tests/tiny.py

IMAGE_ID = 5


def tiny_config(**train):
    """The tiny config, one block per stack (the step's properties hold at any depth)."""
    config = one_block_each(config_utils.load_config("configs/harmon.py:tiny"))
    config.data.image_token_id = IMAGE_ID
    config.data.i2t_batch_size = config.data.t2i_batch_size = 4
    config.train.steps = 10
    config.train.update(train)
    return config


def synthetic_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    m, d = config.model, config.data
    b1, b2, s = d.i2t_batch_size, d.t2i_batch_size, d.image_size
    n_img, t2 = d.num_image_tokens, 12
    t1 = n_img + 30
    tokens = rng.integers(10, m.llm.vocab_size, (b1, t1)).astype(np.int32)
    tokens[:, 2:2 + n_img] = IMAGE_ID
    targets = np.full((b1, t1), -1, np.int32)
    targets[:, 2 + n_img:-3] = tokens[:, 3 + n_img:-2]        # answer tokens; last 2 = padding
    mask = np.ones((b1, t1), np.int32)
    mask[:, -2:] = 0
    t2i_mask = np.ones((b2, t2), np.int32)
    t2i_mask[1, -4:] = 0
    return {
        "i2t_images": rng.uniform(-1, 1, (b1, s, s, 3)).astype(np.float32),
        "i2t_tokens": tokens, "i2t_targets": targets, "i2t_mask": mask,
        "t2i_images": rng.uniform(-1, 1, (b2, s, s, 3)).astype(np.float32),
        "t2i_tokens": rng.integers(10, m.llm.vocab_size, (b2, t2)).astype(np.int32), "t2i_mask": t2i_mask,
    }


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])


def run_steps(config, mesh, n=3, compiled=None):
    """``n`` steps on one synthetic batch: (start params, end state, each step's metrics).
    ``compiled``: a :func:`default_step` pair for ``config`` (its state is copied, not donated)."""
    if compiled:
        step, state = compiled[0], jax.tree.map(jnp.copy, compiled[1])
    else:
        state = create_train_state(config, mesh, jax.random.key(0))
    batch = synthetic_batch(config)
    step = step if compiled else step_lib.jit_train_step(config, mesh, state_shardings(state), batch)
    start = jax.tree.map(np.asarray, state.params)
    history = []
    with jax.set_mesh(mesh):
        for _ in range(n):
            state, metrics = step(state, batch, jax.random.key(1))
            history.append(jax.tree.map(float, metrics))
    return start, state, history


@pytest.fixture(scope="module")
def default_step(mesh1):
    """The default tiny config's jitted step on one device (traced and compiled once) and its
    initial state (the step takes states of this one's structure: copy it, the step donates)."""
    config = tiny_config()
    state = create_train_state(config, mesh1, jax.random.key(0))
    return step_lib.jit_train_step(config, mesh1, state_shardings(state), synthetic_batch(config)), state


@pytest.fixture(scope="module")
def float32_two_steps(mesh1, default_step):
    """The reference two steps of the default tiny config on one device (shared by the tests
    that compare a sharded or a bfloat16 step against it)."""
    return run_steps(tiny_config(), mesh1, n=2, compiled=default_step)


@pytest.mark.slow
def test_steps_reduce_loss_and_update_everything(mesh1):
    """30 steps on one batch: both losses fall and every group trains, the readout aid
    (``model.readout_weight``, tiny's only) included: the step's loss is the weighted sum."""
    assert "readout" not in harmon.abstract_params(config_utils.load_config("configs/harmon.py:0.5b").model)
    config = tiny_config(steps=30)
    config.optimizer.lr = 1e-3
    config.model.readout_weight = 2.0
    start, state, history = run_steps(config, mesh1, n=30)
    first, metrics = history[0], history[-1]
    assert np.isfinite(first["loss"]) and first["i2t_loss"] > 0 and first["t2i_loss"] > 0
    t = config.train
    assert first["loss"] == pytest.approx(t.i2t_weight * first["i2t_loss"] + t.t2i_weight * (
        first["t2i_loss"] + 2.0 * first["t2i_readout_loss"]), rel=1e-5)
    assert int(state.step) == 30
    for group in ("llm", "mar", "head", "proj_in", "proj_out", "readout"):
        moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), start[group], state.params[group])
        assert (all if group == "readout" else any)(jax.tree.leaves(moved)), group
    # The same batch 30 times: every loss must fall below its first value.
    assert metrics["i2t_loss"] < 0.8 * first["i2t_loss"]
    assert metrics["t2i_loss"] < first["t2i_loss"]
    assert metrics["t2i_readout_loss"] < 0.5 * first["t2i_readout_loss"]


@pytest.mark.slow
def test_stage1_freezes_the_llm(mesh1):
    start, state, _ = run_steps(tiny_config(stage=1), mesh1, n=2)
    for a, b in zip(jax.tree.leaves(start["llm"]), jax.tree.leaves(state.params["llm"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert not np.array_equal(start["proj_in"]["fc1"]["kernel"], np.asarray(state.params["proj_in"]["fc1"]["kernel"]))


def test_understanding_gradient_into_mar_is_scaled(mesh1):
    config = tiny_config()
    params = jax.jit(harmon.init, static_argnums=0)(layers.freeze(config.model), jax.random.key(0))
    batch = {k: v for k, v in synthetic_batch(config).items() if k.startswith("i2t")}
    toks = step_lib.image_tokens(initial_tokenizer_params(config, jax.random.key(0)), config.model, batch["i2t_images"])

    # Compiled (eager, each call runs thousands of ops one by one); the scale is static.
    grads = jax.jit(jax.grad(lambda p, scale: step_lib.i2t_loss(p, config.model, batch, toks, IMAGE_ID, scale)[0]),
                    static_argnums=1)
    grads = functools.partial(grads, params)

    g1, g01 = grads(1.0), grads(0.1)
    for group, ratio in (("mar", 0.1), ("proj_in", 0.1), ("llm", 1.0)):
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g01[group])])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g1[group])])
        np.testing.assert_allclose(a, ratio * b, rtol=1e-4, atol=1e-6 * np.abs(b).max())


def test_understanding_loss_projects_only_the_positions_after_the_image():
    """``data.i2t_loss_start`` (derived): no target lies before it in real batches, and the loss
    and its metrics from there on equal those over the whole sequence."""
    from unimm.data import pipeline
    config = one_block_each(config_utils.load_config("configs/harmon.py:tiny"))
    config.data.i2t_batch_size, config.data.t2i_batch_size = 4, 0
    tok = text.shapes_tokenizer()
    config = resolve.resolve(config, tok)
    d = config.data
    batch = {k: jnp.asarray(v) for k, v in next(pipeline.make_train_iterator(
        config, tok, process_index=0, process_count=1)).items()}
    start = d.i2t_loss_start
    first_image = int(np.argmax(np.asarray(batch["i2t_tokens"][0]) == d.image_token_id))
    assert start == first_image + d.num_image_tokens and 0 < start < d.i2t_seq_len
    assert (np.asarray(batch["i2t_targets"][:, :start]) == -1).all()
    assert (np.asarray(batch["i2t_targets"][:, start:]) >= 0).any()
    params = jax.jit(harmon.init, static_argnums=0)(layers.freeze(config.model), jax.random.key(0))
    toks = step_lib.image_tokens(initial_tokenizer_params(config, jax.random.key(0)), config.model, batch["i2t_images"])
    loss = jax.jit(lambda p, first: step_lib.i2t_loss(p, config.model, batch, toks, d.image_token_id, 0.1,
                                                      start=first), static_argnums=1)
    (whole, m_whole), (cut, m_cut) = loss(params, 0), loss(params, start)
    np.testing.assert_allclose(float(cut), float(whole), rtol=1e-6)
    assert float(m_cut["i2t_token_acc"]) == float(m_whole["i2t_token_acc"])


def test_planning_loss_trains_the_llm_alone_on_the_description():
    """The planning task's loss (text only): the LLM's cross-entropy of the description after
    the planning prompt, by hand from the LM's logits; no gradient reaches MAR or the head."""
    from unimm.data import pipeline
    from unimm.models import qwen2
    config = one_block_each(config_utils.load_config("configs/harmon.py:tiny"))
    config.data.i2t_batch_size, config.data.t2i_batch_size, config.data.plan_batch_size = 0, 0, 4
    config.data.plan_seq_len = 88
    tok = text.shapes_tokenizer()
    config = resolve.resolve(config, tok)
    batch = {k: jnp.asarray(v) for k, v in next(pipeline.make_train_iterator(
        config, tok, process_index=0, process_count=1)).items()}
    assert set(batch) == {"plan_tokens", "plan_targets", "plan_mask"}
    params = jax.jit(harmon.init, static_argnums=0)(layers.freeze(config.model), jax.random.key(0))
    loss_fn = functools.partial(step_lib.loss_fn, config=config)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, {}, batch, jax.random.key(1))
    mask = np.asarray(batch["plan_mask"]).astype(bool)
    hidden, _ = qwen2.forward(params["llm"], config.model.llm, qwen2.embed(params["llm"], config.model.llm,
                              batch["plan_tokens"]), qwen2.positions_from_mask(mask), mask)
    logp = np.asarray(jax.nn.log_softmax(qwen2.lm_logits(params["llm"], config.model.llm, hidden)))
    targets = np.asarray(batch["plan_targets"])
    rows, cols = np.nonzero(targets >= 0)
    ce = -logp[rows, cols, targets[rows, cols]].mean()
    np.testing.assert_allclose(float(metrics["plan_loss"]), ce, rtol=1e-5)
    assert config.train.plan_weight == 0.5        # the shapes recipe's: the total is weighted
    np.testing.assert_allclose(float(loss), 0.5 * float(metrics["plan_loss"]), rtol=1e-6)
    norms = {k: float(optax.tree.norm(v)) for k, v in grads.items()}
    assert norms["llm"] > 0 and all(v == 0 for k, v in norms.items() if k != "llm"), norms


@pytest.mark.slow
def test_sharded_step_matches_single_device(float32_two_steps):
    _, want, m_want = float32_two_steps
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, got, m_got = run_steps(tiny_config(), mesh8, n=2)
    np.testing.assert_allclose([m["loss"] for m in m_got], [m["loss"] for m in m_want], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
        # Reduction order differs across shardings: one element in 65k differed by 2.3e-5.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5, rtol=1e-4)


def test_head_on_masked_rows_is_the_step_on_every_token_sharded_too(mesh1):
    """Harmon's masks (one ratio per batch, >= 0.5 here): the head on each image's masked tokens
    in the smallest of 4 sizes (on a 2x2x2 mesh) trains as the head on every token does."""
    def config(buckets):
        c = tiny_config()
        c.model.mar.update(mask_ratio_dist="truncnorm", mask_ratio_per_example=False, mask_ratio_min=0.5,
                           mask_full_prob=0.0)
        c.model.diffusion.loss_row_buckets = buckets
        return c
    _, want, m_want = run_steps(config(1), mesh1, n=3)
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, got, m_got = run_steps(config(4), mesh8, n=3)
    tokens = config(4).model.mar.grid ** 2
    assert any(np.ceil(tokens * m["mask_ratio"] - 1e-4) < tokens for m in m_got)   # a smaller size ran
    np.testing.assert_allclose([m["t2i_loss"] for m in m_got], [m["t2i_loss"] for m in m_want], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(want.params), jax.tree.leaves(got.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5, rtol=1e-4)


@pytest.mark.slow
def test_stage3_trains_and_samples_at_twice_the_resolution(mesh1):
    config = tiny_config(stage=3)
    m = config.model
    config = resolve.thaw(resolve.resolve(config, text.shapes_tokenizer()))   # thawed: the ids change
    config.data.image_token_id = IMAGE_ID     # synthetic batches use their own ids
    g = 2 * m.mar.grid
    assert config.data.image_size == 2 * m.image_size
    assert config.data.num_image_tokens == g * g + m.mar.buffer_size
    start, state, history = run_steps(config, mesh1, n=2)
    metrics = history[-1]
    assert np.isfinite(metrics["loss"]) and metrics["i2t_loss"] > 0 and metrics["t2i_loss"] > 0
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), start["llm"], state.params["llm"])
    assert any(jax.tree.leaves(moved))     # stage 3 trains the LLM too
    tokens = np.full((2, 6), 7, np.int32)
    out = harmon_sample.generate_image_tokens(state.params, layers.freeze(m), tokens, np.ones_like(tokens),
                                              jax.random.key(0), num_iter=4, guided=False, num_steps="5", grid=g)
    assert out.shape == (2, g * g, m.mar.token_dim) and np.isfinite(np.asarray(out)).all()


@pytest.mark.slow
def test_mixed_precision_keeps_float32_params_and_optimizer_state(mesh1, float32_two_steps):
    """bf16 compute (the components' ``dtype``) with float32 params, moments and EMA; the
    losses stay close to the float32 step's and the remat / scan switches compose with it."""
    config = tiny_config()
    ref = float32_two_steps[2][-1]
    for part in ("llm", "mar", "diffusion"):
        config.model[part].dtype = "bfloat16"
    config.model.llm.remat, config.model.llm.scan_layers = "full", True
    _, state, history = run_steps(config, mesh1, n=2)
    metrics = history[-1]
    for tree in (state.params, state.opt_state, state.ema_params):
        floats = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert floats == {np.dtype("float32")}
    assert np.isfinite(metrics["loss"])
    np.testing.assert_allclose(metrics["i2t_loss"], ref["i2t_loss"], rtol=0.05)
    np.testing.assert_allclose(metrics["t2i_loss"], ref["t2i_loss"], rtol=0.1)


def test_apply_gradients_skips_a_nonfinite_update():
    """The update shared by train_step and GRPO's steps: a NaN gradient or loss keeps params,
    moments and EMA and counts the step; a finite one moves them (a toy pytree: no compile of
    the model)."""
    import optax
    from unimm.train.state import TrainState
    params = {"a": jnp.ones(3), "b": {"c": jnp.full((2, 2), 2.0)}}
    tx = optax.adamw(1e-2)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       ema_params=jax.tree.map(jnp.copy, params), tokenizer_params={}, tx=tx)
    apply = jax.jit(step_lib.apply_gradients, static_argnums=2)
    grads = jax.tree.map(jnp.ones_like, params)
    snapshot = lambda s: jax.tree.map(np.asarray, (s.params, s.opt_state, s.ema_params))
    for bad_grads, loss in ((jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads), jnp.float32(1.0)),
                            (grads, jnp.float32(jnp.inf))):
        new, skipped = apply(state, bad_grads, 0.9, loss)
        assert float(skipped) == 1.0 and int(new.step) == 1
        jax.tree.map(np.testing.assert_array_equal, snapshot(new), snapshot(state))
    new, skipped = apply(state, grads, 0.9, jnp.float32(1.0))
    assert float(skipped) == 0.0 and int(new.step) == 1
    np.testing.assert_allclose(new.params["a"], 1.0 - 1e-2 * (1 + 1e-4), rtol=1e-5)   # Adam: ~lr per step
    np.testing.assert_allclose(new.ema_params["a"], 0.9 + 0.1 * np.asarray(new.params["a"]), rtol=1e-6)


@pytest.mark.slow   # the fast tier checks apply_gradients alone (above)
def test_nonfinite_step_changes_nothing_but_the_step(mesh1, default_step):
    config = tiny_config()
    step, state = default_step[0], jax.tree.map(jnp.copy, default_step[1])
    batch = synthetic_batch(config)
    batch["t2i_images"][0, 0, 0, 0] = np.nan          # one NaN pixel poisons the loss
    before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema_params))
    with jax.set_mesh(mesh1):
        state, metrics = step(state, batch, jax.random.key(1))
    assert float(metrics["nonfinite"]) == 1.0 and int(state.step) == 1
    after = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema_params))
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_nonfinite_guard_stops_after_a_run():
    from unimm.train.runner import NonFiniteGuard
    guard = NonFiniteGuard(3)
    for i, flag in enumerate([1.0, 0.0, 1.0, 1.0]):
        guard.observe(jnp.float32(flag), i + 1)
    guard.flush()
    assert (guard.total, guard.run) == (3, 2)
    guard.observe(jnp.float32(1.0), 5)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(up to step 5\).*max_nonfinite_steps=3"):
        guard.flush()


def test_readout_loss_by_hand():
    rng = np.random.default_rng(0)
    z, tokens = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 5))
    kernel, bias = rng.normal(size=(4, 5)), rng.normal(size=(5,))
    mask = np.array([[1, 0, 1], [0, 0, 1]], bool)
    want = np.mean([np.mean((z[b, i] @ kernel + bias - tokens[b, i]) ** 2) for b, i in zip(*np.nonzero(mask))])
    got = harmon.readout_loss({"readout": {"kernel": kernel, "bias": bias}}, jnp.asarray(z), jnp.asarray(tokens),
                              jnp.asarray(mask))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_head_lr_scale_multiplies_only_the_heads_updates():
    from unimm.train.optimizer import make_optimizer
    params = {"head": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, "mar": {"w": jnp.ones((3, 4))}}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
    opt = config_utils.load_config("configs/harmon.py:tiny").optimizer
    opt.warmup_fraction = 0.0
    updates = {}
    for scale in (1.0, 3.0):
        opt.head_lr_scale = scale
        tx, _ = make_optimizer(opt, total_steps=10)
        updates[scale], _ = tx.update(grads, tx.init(params), params)
    for key in ("w", "b"):
        np.testing.assert_allclose(updates[3.0]["head"][key], 3.0 * updates[1.0]["head"][key], rtol=1e-6)
    np.testing.assert_array_equal(updates[3.0]["mar"]["w"], updates[1.0]["mar"]["w"])
    assert float(jnp.abs(updates[1.0]["head"]["w"]).max()) > 0
    tx, _ = make_optimizer(opt, total_steps=10, frozen=("head",))   # a frozen head stays frozen
    frozen, _ = tx.update(grads, tx.init(params), params)
    assert not any(float(jnp.abs(u).max()) for u in jax.tree.leaves(frozen["head"]))
