"""Unified-GRPO with the decoder as the policy: recorded steps, ratio 1, KL 0, a step that learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm import config_utils, resolve, schema, sharding
from unimm.data import text
from unimm.models import harmon, harmon_sample, layers
from unimm.rl import decoder as rl_decoder
from unimm.train import grpo, grpo_decoder
from unimm.train.state import create_train_state, initial_tokenizer_params, state_shardings

from tiny import one_block_each, sigterm_after_step   # tests/tiny.py

STEPS, ITERS = "5", 3


def _rollout(dtype="float32", cfg_schedule="constant"):
    """The fixture config (compute ``dtype``, CFG 3 on ``cfg_schedule``), params with a non-zero
    head, and a rollout of 4 prompts drawn by them, the policy also being the reference."""
    config = one_block_each(config_utils.load_config("configs/grpo.py:tiny"))
    config.grpo.policy, config.grpo.trainable = "decoder", ("mar", "head")
    config.grpo.decoder.rollout_steps, config.grpo.decoder.step_fraction = STEPS, 1.0
    config.sample.cfg, config.sample.temperature, config.sample.cfg_schedule = 3.0, 1.0, cfg_schedule
    for part in ("llm", "mar", "diffusion"):
        config.model[part].dtype = dtype
    tok = resolve.make_tokenizer(config)
    config = resolve.resolve(config, tok)
    cfg = layers.freeze(config.model)
    params = jax.jit(harmon.init, static_argnums=0)(cfg, jax.random.key(0))
    final = params["head"]["final_layer"]["linear"]   # non-zero output layer: a real policy
    final["kernel"] = 0.05 * jax.random.normal(jax.random.key(1), final["kernel"].shape)
    prompts = ["a photo of a red circle", "a photo of two squares"] * 2
    tokens, mask = (jnp.asarray(a) for a in text.t2i_rows(tok, prompts, config.data.max_t2i_len, True))
    rollout = grpo_decoder.image_rollout(params, params, cfg, tokens[:4], mask[:4], tokens[4:], mask[4:],
                                         jax.random.key(2), num_iter=ITERS, guided=True, cfg_scale=3.0,
                                         cfg_schedule=cfg_schedule, num_steps=STEPS)
    return config, cfg, params, rollout


@pytest.fixture(scope="module")
def setup():
    return _rollout()


def _scored(rollout, adv):
    return {**rollout, "advantages": jnp.asarray(adv, jnp.float32), "group_valid": jnp.ones(len(adv), bool)}


def _jit_loss(config):
    """``decoder_grpo_loss`` under ``config``, compiled (eager, each call re-runs thousands of ops)."""
    return jax.jit(lambda p, r: grpo_decoder.decoder_grpo_loss(p, r, jax.random.key(0), config=config))


def _jit_loss_and_grad(config):
    return jax.jit(jax.value_and_grad(lambda p, r: grpo_decoder.decoder_grpo_loss(
        p, r, jax.random.key(0), config=config), has_aux=True))


@pytest.fixture(scope="module")
def plain(setup):
    """The fixture config's loss and metrics on the rollout scored [1, -1, 0.5, -0.5]."""
    config, cfg, params, rollout = setup
    return jax.device_get(_jit_loss(config)(params, _scored(rollout, [1.0, -1.0, 0.5, -0.5])))


def test_rollout_records_every_token_once(setup):
    config, cfg, params, rollout = setup
    b, seq = 4, cfg.mar.grid ** 2
    assert rollout["image_tokens"].shape == (b, seq, cfg.mar.token_dim)
    assert rollout["x"].shape[:3] == (b, ITERS, int(STEPS))
    drawn = np.zeros((b, seq), int)
    for i in range(ITERS):
        for r in range(b):
            pos, ok = np.asarray(rollout["pos"][r, i]), np.asarray(rollout["pos_valid"][r, i])
            np.add.at(drawn[r], pos[ok], 1)
    assert (drawn == 1).all()
    # the last recorded step's x_next is the token written into the image
    last = np.asarray(rollout["x_next"][:, :, -1])               # [b, I, W, D]
    for r in range(b):
        for i in range(ITERS):
            ok = np.asarray(rollout["pos_valid"][r, i])
            drawn = np.asarray(rollout["image_tokens"][r])[np.asarray(rollout["pos"][r, i])[ok]]
            np.testing.assert_allclose(last[r, i][ok], drawn, atol=1e-6)


def _assert_first_ratio_is_one(m, rollout):
    """The update's ratio to the rollout's old log-probs: 1 within 2 ulps of the largest
    log-prob (a sum over channels, ~300 here), as both come from ``step_log_probs``."""
    ulp = float(np.spacing(np.float32(np.abs(np.asarray(rollout["old_log_probs"])).max())))
    assert abs(float(m["ratio_max"]) - 1.0) <= 2 * ulp, (float(m["ratio_max"]) - 1.0, ulp)
    assert abs(float(m["kl"])) < 1e-5 and float(m["clip_fraction"]) == 0.0


def test_first_epoch_ratio_is_one_and_kl_zero(setup, plain):
    _assert_first_ratio_is_one(plain[1], setup[3])


def test_rollout_draws_the_samplers_images(setup):
    """A rollout is ``generate_image_tokens`` itself: the same key gives the same images."""
    config, cfg, params, rollout = setup
    rows = (jnp.concatenate([rollout[k], rollout["uncond_" + k]]) for k in ("tokens", "mask"))
    img = harmon_sample.generate_image_tokens(params, cfg, *rows, jax.random.key(2), num_iter=ITERS, guided=True,
                                              cfg_scale=3.0, num_steps=STEPS)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(rollout["image_tokens"]))
    np.testing.assert_array_equal(np.asarray(rollout["scale"]), 3.0)


@pytest.mark.slow
def test_first_epoch_ratio_is_one_in_bfloat16_with_linear_cfg():
    """bf16 compute and Muse's linear CFG schedule: each iteration's scale is recorded and
    re-used by the update, and the first ratio is still 1."""
    config, cfg, params, rollout = _rollout("bfloat16", "linear")
    seq = cfg.mar.grid ** 2
    _, cfg_len = harmon_sample.mask_schedule(ITERS, seq)
    np.testing.assert_allclose(np.asarray(rollout["scale"]), np.broadcast_to(
        1.0 + 2.0 * (seq - cfg_len) / seq, (4, ITERS)), rtol=1e-6)
    _, m = jax.device_get(_jit_loss(config)(params, _scored(rollout, [1.0, -1.0, 0.5, -0.5])))
    _assert_first_ratio_is_one(m, rollout)


def test_noisiest_step_selection_trains_only_the_first_steps(setup):
    """grpo.decoder.step_selection='noisiest': the loss sees the first ceil(fraction x S) diffusion steps
    of every iteration (first = noisiest) and nothing of the later ones."""
    config, cfg, params, rollout = setup
    config = resolve.thaw(config)
    config.grpo.decoder.step_selection, config.grpo.decoder.step_fraction = "noisiest", 0.5
    scored = _scored(rollout, [1.0, -1.0, 0.5, -0.5])
    assert grpo_decoder.noisiest_steps(scored, 0.5)["x"].shape[2] == 3 == int(np.ceil(0.5 * int(STEPS)))
    jitted = _jit_loss(config)
    loss = lambda r: float(jitted(params, r)[0])
    base = loss(scored)
    shifted = lambda lo, hi: {**scored, "x_next": scored["x_next"].at[:, :, lo:hi].add(0.3)}
    assert loss(shifted(3, None)) == base          # the late steps do not count
    assert abs(loss(shifted(0, 1)) - base) > 1e-3  # the noisiest step does


@pytest.mark.slow
def test_supervised_anchor_adds_the_t2i_loss(setup, plain):
    """grpo.decoder.sft_weight: the step's loss is the GRPO loss plus weight x train_step's T2I loss on
    the batch riding in the rollout; its gradient reaches the LLM, which GRPO alone leaves."""
    config, cfg, params, rollout = setup
    tok = resolve.make_tokenizer(config)
    config = resolve.thaw(config)
    config.grpo.decoder.sft_weight, config.grpo.decoder.sft_batch_size = 0.5, 4
    from unimm.train import step
    batch = rl_decoder.anchor_batch(config, tok, initial_tokenizer_params(config, jax.random.key(0)), 3)
    assert batch["t2i_latents"].shape == (4, 9, cfg.mar.token_dim) and batch["t2i_tokens"].shape[0] == 4
    scored = _scored(rollout, [1.0, -1.0, 0.5, -0.5])
    (anchored, m), grad = _jit_loss_and_grad(config)(params, {**scored, **batch})
    sft, _ = jax.jit(lambda p, b: step.t2i_loss(p, cfg, b, b["t2i_latents"], jax.random.fold_in(
        jax.random.key(0), 1)))(params, batch)
    np.testing.assert_allclose(float(anchored), float(plain[0]) + 0.5 * float(sft), rtol=1e-5)
    assert float(m["sft_t2i_loss"]) > 0
    assert float(optax.tree.norm(grad["llm"])) > 0


@pytest.mark.slow
def test_retain_rollouts_hold_every_step_to_the_reference(setup):
    """grpo.decoder.retain_weight: the loss adds weight x the mean Gaussian KL to the reference over
    every diffusion step of the retain rollouts, whatever the groups and the step selection
    (here the noisiest half, every group dropped); 0 where the policy is the reference."""
    config, cfg, params, rollout = setup
    config = resolve.thaw(config)
    config.grpo.decoder.update(dict(retain_weight=2.0, step_selection="noisiest", step_fraction=0.5))
    retain = grpo_decoder.as_retain(rollout)   # drawn by params, the reference too
    dropped = {**_scored(rollout, [1.0, -1.0, 0.5, -0.5]), "group_valid": jnp.zeros(4, bool)}
    loss_and_grad = _jit_loss_and_grad(config)
    (same, m), _ = loss_and_grad(params, {**dropped, **retain})
    assert abs(float(m["retain_kl"])) < 1e-5 and abs(float(same)) < 1e-5
    final = params["head"]["final_layer"]["linear"]
    moved = {**params, "head": {**params["head"], "final_layer": {**params["head"]["final_layer"], "linear": {
        **final, "kernel": final["kernel"] + 0.02 * jax.random.normal(jax.random.key(3), final["kernel"].shape)}}}}
    (total, m), grad = loss_and_grad(moved, {**dropped, **retain})
    mean, log_var = jax.jit(lambda p, r: grpo_decoder.step_means(p, cfg, r, guided=True,
                                                                 num_steps=STEPS))(moved, rollout)
    mean, log_var, ref_mean, ref_log_var = (np.asarray(x, np.float64) for x in (
        mean, log_var, rollout["ref_mean"], rollout["ref_log_var"]))
    kl = 0.5 * (ref_log_var - log_var + (np.exp(log_var) + (mean - ref_mean) ** 2) / np.exp(ref_log_var) - 1).sum(-1)
    counts = np.asarray(rollout["pos_valid"])[:, :, None, :] & (np.asarray(rollout["t"]) > 0)[..., None]
    assert counts[:, :, 3:].any()   # the late steps, which the noisiest selection leaves out, count here
    expected = (kl * counts).sum() / counts.sum()
    assert expected > 1e-4
    np.testing.assert_allclose(float(m["retain_kl"]), expected, rtol=1e-4)
    np.testing.assert_allclose(float(total), 2.0 * expected, rtol=1e-4)   # no group left to GRPO
    # Its gradient pulls the policy back towards the reference.
    back = jax.tree.map(lambda p, g: p - 1e-3 / float(optax.tree.norm(grad)) * g, moved, grad)
    assert float(loss_and_grad(back, {**dropped, **retain})[0][1]["retain_kl"]) < float(m["retain_kl"])


@pytest.mark.slow
def test_decoder_step_moves_the_policy_towards_high_reward(setup):
    config, cfg, params, rollout = setup
    scored = _scored(rollout, [1.0, -1.0, 1.0, -1.0])
    loss_and_grad = _jit_loss_and_grad(config)
    # The gradient is a descent direction of the clipped objective: a short step along it
    # raises the log-probs of the high-advantage images relative to the others.
    (loss, _), grad = loss_and_grad(params, scored)
    norm = float(optax.tree.norm(grad))
    assert np.isfinite(norm) and norm > 0
    moved = jax.tree.map(lambda p, g: p - 1e-5 / norm * g, params, grad)   # log-probs are steep: ~1e3 gradient norm
    assert float(loss_and_grad(moved, scored)[0][0]) < float(loss)
    # grpo.decoder.train_variance=False: the head's variance channels (its output's second half) get no
    # gradient; the mean channels get the same one.
    fixed_config = resolve.thaw(config)
    fixed_config.grpo.decoder.train_variance = False
    fixed = jax.jit(jax.grad(lambda p: grpo_decoder.decoder_grpo_loss(p, scored, jax.random.key(0),
                                                                      config=fixed_config)[0]))(params)
    kernel = lambda g: np.asarray(g["head"]["final_layer"]["linear"]["kernel"])
    c = kernel(grad).shape[1] // 2
    assert np.abs(kernel(fixed)[:, c:]).max() == 0.0 and np.abs(kernel(grad)[:, c:]).max() > 0
    np.testing.assert_allclose(kernel(fixed)[:, :c], kernel(grad)[:, :c], rtol=1e-4,
                               atol=1e-6 * np.abs(kernel(grad)).max())


@pytest.mark.slow
def test_decoder_grpo_step_sharded_equals_single_device(setup):
    config, cfg, params, rollout = setup
    scored = _scored(rollout, [1.0, -1.0, 0.5, -0.5])
    results = []
    for shape in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:1] if shape == {"data": 1} else None)
        copy = jax.tree.map(jnp.array, params)   # the step donates its state; keep the fixture's
        state = create_train_state(config, mesh, jax.random.key(0), params=copy)
        sharded = grpo.shard_rollout(scored, mesh)
        step = grpo.jit_grpo_step(config, mesh, state_shardings(state), sharded,
                                  step_fn=grpo_decoder.decoder_grpo_step)
        with jax.set_mesh(mesh):
            for _ in range(2):   # the second step sees ratios != 1 and a non-zero KL
                state, m = step(state, sharded, jax.random.key(0))
        results.append((jax.device_get(m), jax.tree.map(np.asarray, state.params)))
    (m1, p1), (m8, p8) = results
    assert float(m1["kl"]) > 0 and float(m1["grad_norm"]) > 0 and float(m1["nonfinite"]) == 0.0
    # Only grpo.trainable groups change (the LLM is frozen here).
    jax.tree.map(np.testing.assert_array_equal, p1["llm"], jax.tree.map(np.asarray, params["llm"]))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree.leaves(p1["head"]), jax.tree.leaves(params["head"])))
    for k in ("loss", "kl", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-3, atol=1e-6, err_msg=k)
    # Adam scales every update to ~lr whatever the gradient's size, so an element whose
    # gradient is ~0 may step either way under a different reduction order: allow a few.
    p0 = jax.tree.leaves(jax.tree.map(np.asarray, params))
    d1 = np.concatenate([(a - z).ravel() for a, z in zip(jax.tree.leaves(p1), p0)])
    d8 = np.concatenate([(b - z).ravel() for b, z in zip(jax.tree.leaves(p8), p0)])
    off = np.abs(d8 - d1) > 2e-6
    cos = d1 @ d8 / (np.linalg.norm(d1) * np.linalg.norm(d8))
    assert off.mean() <= 1e-3 and cos > 0.999 and np.abs(d8 - d1).max() <= 4 * config.optimizer.lr, (
        off.sum(), off.size, cos)


@pytest.mark.slow
def test_decoder_policy_loop_runs_and_resumes(tmp_path, monkeypatch):
    from unimm.train import grpo_loop
    config = one_block_each(config_utils.load_config("configs/grpo.py:tiny"))
    config.grpo.update(dict(policy="decoder", trainable=("mar", "head"), group_size=2, inputs_per_step=4,
                            decoder=dict(rollout_steps="4")))
    config.sample.num_iter, config.sample.max_new_tokens = 3, 6
    config.train.steps, config.train.checkpoint_every, config.train.log_every = 2, 1, 1
    # Each step draws two training images' captions and two GenEval prompts, G images each,
    # with the supervised anchor and retain rollouts (the loss without them:
    # test_decoder_step_moves_the_policy_towards_high_reward). Both runs have the same
    # batch shapes, so the resumed run finds its step in the compilation cache.
    config.grpo.decoder.prompts = "both"
    assert rl_decoder.geneval_share(config.grpo) == 2
    config.grpo.decoder.sft_weight, config.grpo.decoder.sft_batch_size = 1.0, 8
    config.grpo.decoder.retain_weight, config.grpo.decoder.retain_batch_size = 1.0, 8
    with monkeypatch.context() as m:   # preempted: SIGTERM after step 1 saves it and returns
        sigterm_after_step(m, 1)
        state = grpo_loop.train_grpo(config, str(tmp_path), evaluate=False)
    assert int(state.step) == 1
    state = grpo_loop.train_grpo(config, str(tmp_path), evaluate=False)
    assert int(state.step) == 2
    # The resumed step: GenEval prompts only (no training image at all).
    config.train.steps, config.grpo.decoder.prompts = 3, "geneval"
    assert rl_decoder.geneval_share(config.grpo) == 4
    state = grpo_loop.train_grpo(config, str(tmp_path), evaluate=False)
    assert int(state.step) == 3
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3
    bad = config_utils.load_config("configs/grpo.py:tiny")   # the loop validates first, builds nothing
    bad.grpo.update(config.grpo)
    bad.grpo.decoder.sft_weight = -1.0
    with pytest.raises(ValueError, match=r"grpo.decoder.sft_weight=-1.0: expected >= 0"):
        grpo_loop.train_grpo(bad, str(tmp_path / "x"), evaluate=False)


def test_grpo_settings_that_cannot_run_together_are_clear_errors():
    base = config_utils.load_config("configs/grpo.py:tiny").grpo
    base.update(dict(policy="decoder", trainable=("mar", "head"), decoder=dict(
        prompts="geneval", sft_weight=1.0, sft_batch_size=8, retain_weight=1.0, retain_batch_size=8)))
    resolve.validate_grpo(base)
    def captioner(**decoder):   # the captioner policy, its decoder group at the defaults but ``decoder``
        return dict(policy="captioner", trainable=("llm",), decoder={**schema.grpo().decoder.to_dict(), **decoder})
    plain_captioner = base.copy_and_resolve_references()
    plain_captioner.update(captioner())
    resolve.validate_grpo(plain_captioner)
    for fields, match in [
        (dict(policy="painter"), r"grpo.policy='painter': expected one of \('captioner', 'decoder'\)"),
        (dict(decoder=dict(prompts="poems")),
         r"grpo.decoder.prompts='poems': expected one of \('captions', 'geneval', 'both'\)"),
        (dict(reward="geneval"), "always scored by the GenEval check"),
        # Either policy's group is left at its defaults by the other policy.
        (dict(policy="captioner", trainable=("llm",)),
         r"grpo.decoder.prompts='geneval' is a setting of the decoder policy, and grpo.policy='captioner': "
         r"leave it at 'captions' or set grpo.policy='decoder'"),
        (captioner(encoder_from="/runs/other"), "grpo.decoder.encoder_from=.* is a setting"),
        (captioner(sft_weight=1.0), "grpo.decoder.sft_weight=1.0 is a setting"),
        (dict(captioner=dict(decoder_from="/runs/other")),
         "grpo.captioner.decoder_from='/runs/other' is a setting of the captioner policy, and grpo.policy='decoder'"),
        (dict(captioner=dict(temperature=1.0)), "grpo.captioner.temperature=1.0 is a setting"),
        (dict(decoder=dict(encoder_from="/runs/other")), "grpo.decoder.prompts='geneval' uses none"),
        (dict(decoder=dict(sft_weight=-1.0)), r"grpo.decoder.sft_weight=-1.0: expected >= 0"),
        (dict(decoder=dict(sft_batch_size=0)), r"grpo.decoder.sft_weight=1.0 needs grpo.decoder.sft_batch_size > 0"),
        (dict(decoder=dict(retain_weight=-1.0)), r"grpo.decoder.retain_weight=-1.0: expected >= 0"),
        (dict(decoder=dict(retain_batch_size=0)),
         r"grpo.decoder.retain_weight=1.0 needs grpo.decoder.retain_batch_size > 0"),
        (dict(decoder=dict(step_selection="latest")),
         r"grpo.decoder.step_selection='latest': expected one of \('random', 'noisiest'\)"),
        (dict(decoder=dict(step_fraction=0.0)), r"grpo.decoder.step_fraction=0.0: expected a fraction in \(0, 1\]")]:
        bad = base.copy_and_resolve_references()
        bad.update(fields)
        with pytest.raises(ValueError, match=match):
            resolve.validate_grpo(bad)
