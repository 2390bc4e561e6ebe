"""The captioner policy of Unified-GRPO: rollout log-probs, the step, sharding, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import config_utils, resolve, schema, sharding
from unimm.data import shapes, text
from unimm.data import images as images_lib
from unimm.models import layers
from unimm.models import vae as vae_lib
from unimm.eval import rewards
from unimm.train import grpo, loop
from unimm.train.state import create_train_state, state_shardings, initial_tokenizer_params

from tiny import one_block_each, sigterm_after_step   # tests/tiny.py


def grpo_config(captioner=None, **grpo_fields):
    """configs/grpo.py:tiny with ``grpo_fields`` and the ``captioner`` group's fields changed."""
    config = config_utils.load_config("configs/grpo.py:tiny")
    config.grpo.update(dict(grpo_fields, captioner=captioner or {}))
    return config


@pytest.fixture(scope="module")
def setup():
    config = grpo_config(group_size=4, captioner=dict(max_new_tokens=10))
    tok = text.shapes_tokenizer()
    config = resolve.resolve(config, tok)
    return config, tok


def prompts_and_images(config, tok, n, seed=0):
    d = config.data
    prompt, mask = text.left_pad([text.i2t_prompt_ids(tok, text.LONG_CAPTION_Q, d.num_image_tokens)] * n, tok.pad_id)
    imgs = np.stack([images_lib.to_model(shapes.render(shapes.sample_scene(seed, i), d.image_size)) for i in range(n)])
    tokenizer = initial_tokenizer_params(config, jax.random.key(0))
    tokens = vae_lib.images_to_tokens(tokenizer, config.model.vae, jnp.asarray(imgs))
    return jnp.asarray(prompt), jnp.asarray(mask), tokens


def rollout(config, tok, params, ref, n, rng, seed=0):
    g, d = config.grpo, config.data
    prompt, mask, image_tokens = prompts_and_images(config, tok, n, seed)
    return grpo.caption_rollout(params, ref, layers.freeze(config.model), prompt, mask, image_tokens, rng,
                                group_size=g.group_size, temperature=g.captioner.temperature,
                                max_new_tokens=g.captioner.max_new_tokens, image_id=d.image_token_id,
                                eos_id=tok.eos_id, pad_id=tok.pad_id), prompt.shape[1]


def make_state(config, mesh):
    return create_train_state(config, mesh, jax.random.key(0))   # GRPO configs freeze non-trainable groups


def test_rollout_log_probs_equal_the_policy_and_ratio_is_one(setup):
    config, tok = setup
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state = make_state(config, mesh)
    r, t = rollout(config, tok, state.params, state.params, 2, jax.random.key(3))
    b = 2 * config.grpo.group_size
    assert r["tokens"].shape == (b, t + config.grpo.captioner.max_new_tokens)
    # Completion tokens: a prefix of the new tokens, ending at (and including) the first eos.
    comp = np.asarray(r["completion_mask"][:, t:])
    assert not np.asarray(r["completion_mask"][:, :t]).any()
    assert (np.diff(comp.astype(int), axis=1) <= 0).all() and comp[:, 0].all()
    # Sampled (temperature 0.7) captions differ within a group.
    assert len({tuple(row) for row in np.asarray(r["tokens"][:config.grpo.group_size])}) > 1
    # The rollout scores the completion only; scoring every position gives the same values there.
    every = jax.jit(grpo.token_log_probs, static_argnums=(1, 5, 6))(
        state.params, layers.freeze(config.model), r["tokens"], r["mask"], r["image_tokens"],
        config.data.image_token_id, config.grpo.captioner.temperature)
    np.testing.assert_allclose(every[:, t:], r["old_log_probs"][:, t:], atol=1e-5)
    assert not np.asarray(r["old_log_probs"][:, :t]).any() and np.asarray(every[:, 1:t]).any()
    with pytest.raises(ValueError, match="first=0"):
        grpo.token_log_probs(state.params, layers.freeze(config.model), r["tokens"], r["mask"],
                             r["image_tokens"], config.data.image_token_id, first=0)
    # Reference = policy here: equal to float rounding (two computations in one program, which
    # XLA may fuse and round differently).
    np.testing.assert_allclose(r["old_log_probs"], r["ref_log_probs"], rtol=1e-6, atol=0)
    assert (np.asarray(r["old_log_probs"]) <= 0).all()

    rewards = jnp.asarray(np.random.default_rng(0).random((2, config.grpo.group_size)), jnp.float32)
    scored = grpo.with_advantages(r, rewards, config.grpo)
    step = grpo.jit_grpo_step(config, mesh, state_shardings(state), scored)
    with jax.set_mesh(mesh):
        state, m = step(state, scored, jax.random.key(0))
    m = jax.device_get(m)
    assert abs(m["ratio_max"] - 1.0) < 1e-5 and m["clip_fraction"] == 0.0 and abs(m["kl"]) < 1e-6
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0


@pytest.mark.slow
def test_grpo_step_sharded_equals_single_device(setup):
    config, tok = setup
    results = []
    for shape in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        devices = jax.devices()[:1] if shape == {"data": 1} else None
        mesh = sharding.make_mesh(shape, devices=devices)
        state = make_state(config, mesh)
        r, _ = rollout(config, tok, state.params, state.params, 2, jax.random.key(3))
        rewards = jnp.arange(2 * config.grpo.group_size, dtype=jnp.float32).reshape(2, -1) % 3
        scored = grpo.shard_rollout(grpo.with_advantages(r, rewards, config.grpo), mesh)
        step = grpo.jit_grpo_step(config, mesh, state_shardings(state), scored)
        with jax.set_mesh(mesh):
            for _ in range(2):
                state, m = step(state, scored, jax.random.key(0))
        results.append((jax.device_get(m), jax.tree.map(np.asarray, state.params)))
    (m1, p1), (m8, p8) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)
    # Only the policy's groups move.
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1["mar"]),
                                                      jax.tree.leaves(make_state(config, sharding.make_mesh(
                                                          {"data": 1}, devices=jax.devices()[:1])).params["mar"])))


@pytest.mark.slow
def test_tiny_grpo_raises_a_simple_reward(setup):
    """Reward 1 when the caption mentions "red": the rate rises within a few dozen steps."""
    config = grpo_config(group_size=8, beta=0.0, captioner=dict(max_new_tokens=8, temperature=1.0))
    config.optimizer.lr = 3e-3
    tok = text.shapes_tokenizer()
    config = resolve.resolve(config, tok)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state = make_state(config, mesh)
    ref = jax.tree.map(jnp.copy, state.params)
    step, rates = None, []
    for i in range(30):
        r, t = rollout(config, tok, state.params, ref, 4, jax.random.key(i), seed=i)
        caps = grpo.caption_texts(tok, r, t)
        hits = np.array(["red" in c.split() for c in caps], np.float32)
        rates.append(hits.mean())
        scored = grpo.with_advantages(r, jnp.asarray(hits.reshape(4, -1)), config.grpo)
        step = step or grpo.jit_grpo_step(config, mesh, state_shardings(state), scored)
        with jax.set_mesh(mesh):
            state, _ = step(state, scored, jax.random.key(0))
    first, last = np.mean(rates[:2]), np.mean(rates[-5:])
    assert last > max(0.5, 3 * first), (first, last, rates)


def loop_test_grpo_config():
    """The GRPO loops' config: 4 inputs x 2 captions, images in 3 MAR iterations of 5 steps,
    one block per stack (as ``tiny_train_config``, whose run the GRPO loop starts from)."""
    config = one_block_each(grpo_config(group_size=2, inputs_per_step=4, captioner=dict(max_new_tokens=6)))
    config.sample.num_iter, config.sample.num_sampling_steps = 3, "5"
    return config


@pytest.mark.slow
def test_grpo_loop_preempted_resumes_bit_exact_and_evaluates_on_cadence(tmp_path, monkeypatch):
    """Three steps straight, against a run stopped by SIGTERM after step 2 and rerun: the same
    params bit for bit. ``train.eval_every`` evaluates during the run and at its end."""
    from unimm.train import grpo_loop
    config = loop_test_grpo_config()
    config.train.steps, config.train.checkpoint_every, config.train.log_every = 3, 1, 1
    config.train.eval_every = 2
    # Rewards that differ within every group, so every step moves the policy (the default reward
    # gives random params' images all the same score, and a step that changes nothing would
    # hide a resume that is off).
    monkeypatch.setitem(rewards.REWARDS, "alternating",
                        lambda source, generated, **_: (np.arange(len(generated)) % 2).astype(np.float32))
    config.grpo.reward = "alternating"
    evaluated = []
    monkeypatch.setattr(grpo_loop, "make_eval_fn", lambda *a, **k: lambda state, step, writer: evaluated.append(step))
    straight = grpo_loop.train_grpo(config, str(tmp_path / "straight"))
    assert int(straight.step) == 3 and evaluated == [2, 3]
    assert sorted(int(p.name) for p in (tmp_path / "straight" / "checkpoints").iterdir()
                  if p.name.isdigit()) == [1, 2, 3]

    evaluated.clear()
    with monkeypatch.context() as m:
        sigterm_after_step(m, 2)
        stopped = grpo_loop.train_grpo(config, str(tmp_path / "preempted"))
    assert int(stopped.step) == 2 and evaluated == []   # saved and returned: no evaluation
    resumed = grpo_loop.train_grpo(config, str(tmp_path / "preempted"))
    assert int(resumed.step) == 3 and evaluated == [3]
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stopped.params["llm"]),
                                                        jax.tree.leaves(resumed.params["llm"])))   # step 3 moved it
    with pytest.raises(ValueError, match="trainable"):
        grpo_loop.train_grpo(grpo_config(trainable=("llm", "vae")), str(tmp_path / "x"), evaluate=False)


@pytest.mark.slow
def test_a_policy_registered_outside_the_library_runs_through_the_loop(tmp_path, monkeypatch):
    """Adding a policy touches no loop code: one defined here, registered by name, samples as
    the captioner does and scores with its own rule; train_grpo runs it and logs its parts."""
    from unimm import rl
    from unimm.train import grpo_loop
    scored = []

    class Alternating(rl.Policy):
        name = "alternating_test"
        step = staticmethod(grpo.grpo_step)
        frozen_decoder = True
        settings = "captioner"   # its rollouts are the captioner's: grpo.captioner.* apply

        def rollout(self, ctx, state, n, indices):
            return rl.get("captioner").rollout(ctx, state, n, indices)

        def score(self, ctx, drawn):
            source, generated = drawn
            scored.append(len(generated))
            return (np.arange(len(generated)) % 2).astype(np.float32), {"reward_alternating": 0.5}

    monkeypatch.setitem(rl.base._POLICIES, Alternating.name, Alternating)
    assert "alternating_test" in rl.names()
    config = loop_test_grpo_config()
    config.grpo.policy = Alternating.name
    config.train.steps, config.train.log_every = 1, 1
    state = grpo_loop.train_grpo(config, str(tmp_path), evaluate=False)
    assert int(state.step) == 1 and scored == [config.grpo.inputs_per_step * config.grpo.group_size]
    events = b"".join(p.read_bytes() for p in tmp_path.glob("events.out.tfevents.*"))
    assert b"reward_alternating" in events   # the policy's own reward parts reach the metric writer
    bad = config.grpo.copy_and_resolve_references()
    bad.policy = "painter"
    with pytest.raises(ValueError, match=r"grpo.policy='painter': expected one of \('captioner', 'decoder', "
                                         r"'alternating_test'\)"):
        resolve.validate_grpo(bad)


@pytest.mark.slow
def test_grpo_starts_from_a_supervised_workdir(tmp_path, monkeypatch, tiny_train_config):
    from unimm import inference
    from unimm.train import grpo_loop
    sup = tiny_train_config()   # tests/test_loop.py's run: its train step comes from the cache
    inference.save_config(sup, str(tmp_path / "sup"))
    trained = loop.train_and_evaluate(sup, str(tmp_path / "sup"))
    config = loop_test_grpo_config()   # the loop test's programs, from the cache
    config.train.steps, config.init_from = 1, str(tmp_path / "sup")
    mesh = sharding.make_mesh({"data": -1})
    start = grpo_loop.starting_params(config, mesh)
    for a, b in zip(jax.tree.leaves(trained.ema_params), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # UAE's two models: the frozen decoder is what grpo.captioner.decoder_from loads (here the same run,
    # so the check is on the wiring: the loaded object itself generates the images).
    loaded, models = {}, []
    real_start, real_model = grpo_loop.starting_params, grpo_loop.Model

    def spy_start(cfg, m, path=None, key="init_from"):
        loaded[key] = real_start(cfg, m, path, key)
        return loaded[key]

    def spy_model(cfg, tok, params, *args, **kwargs):
        models.append(params)
        return real_model(cfg, tok, params, *args, **kwargs)

    monkeypatch.setattr(grpo_loop, "starting_params", spy_start)
    monkeypatch.setattr(grpo_loop, "Model", spy_model)
    config.grpo.captioner.decoder_from = str(tmp_path / "sup")
    state = grpo_loop.train_grpo(config, str(tmp_path / "rl"), evaluate=False)
    monkeypatch.undo()
    assert int(state.step) == 1
    assert set(loaded) == {"init_from", "grpo.captioner.decoder_from"}
    assert models and models[0] is loaded["grpo.captioner.decoder_from"]
    for group in ("mar", "head", "proj_in", "proj_out"):     # frozen under grpo.trainable = ("llm",)
        for a, b in zip(jax.tree.leaves(trained.ema_params[group]), jax.tree.leaves(state.params[group])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The decoder policy's frozen captioner from another run (grpo.decoder.encoder_from): that run's
    # params build the model that captions the training images (no step: the decoder policy's
    # loop itself runs in tests/test_grpo_decoder.py).
    loaded.clear()
    models.clear()
    monkeypatch.setattr(grpo_loop, "starting_params", spy_start)
    monkeypatch.setattr(grpo_loop, "Model", spy_model)
    config.grpo.update(dict(policy="decoder", trainable=("mar", "head"), captioner=schema.grpo().captioner,
                            decoder=dict(encoder_from=str(tmp_path / "sup"))))
    config.train.steps = 0
    grpo_loop.train_grpo(config, str(tmp_path / "rl_dec"), evaluate=False)
    monkeypatch.undo()
    assert set(loaded) == {"init_from", "grpo.decoder.encoder_from"} and loaded["grpo.decoder.encoder_from"] is not None
    assert models[-1] is loaded["grpo.decoder.encoder_from"]
    config.train.steps = 1
    config.grpo.update(dict(policy="captioner", trainable=("llm",), decoder=dict(encoder_from=""),
                            captioner=dict(decoder_from=str(tmp_path / "sup"))))
    config.init_from = ""
    config.model.llm.hidden_size = 64
    with pytest.raises(ValueError, match=r"grpo.captioner.decoder_from=.*does not match"):
        grpo_loop.train_grpo(config, str(tmp_path / "rl3"), evaluate=False)
    config.grpo.captioner.decoder_from, config.init_from = "", str(tmp_path / "sup")
    with pytest.raises(ValueError, match="init_from=.*does not match"):
        grpo_loop.train_grpo(config, str(tmp_path / "rl2"), evaluate=False)
