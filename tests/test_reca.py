"""RecA's reconstruction task: its batches, its loss as a composition of the generation
pieces, the 0.1 gradient scale into the understanding path, and the task mix's checks."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import config_utils, resolve, sharding
from unimm.data import pipeline, text
from unimm.models import gaussian_diffusion, harmon, mar, qwen2
from unimm.train import step as step_lib
from unimm.train.state import create_train_state, state_shardings, initial_tokenizer_params

from tiny import one_block_each   # tests/tiny.py


@pytest.fixture(scope="module")
def setup():
    """The tiny config (one block per stack) with 4 reconstruction examples per step and no
    other task, its first batch and fresh params."""
    config = one_block_each(config_utils.load_config("configs/harmon.py:tiny"))
    config.data.i2t_batch_size, config.data.t2i_batch_size, config.data.recon_batch_size = 0, 0, 4
    config.data.plan_batch_size = 0
    tok = text.shapes_tokenizer()
    config = resolve.resolve(config, tok)
    batch = next(pipeline.make_train_iterator(config, tok, process_index=0, process_count=1))
    params = harmon.init(config.model, jax.random.key(0))
    return config, tok, {k: jnp.asarray(v) for k, v in batch.items()}, params


def test_recon_batches_hold_the_image_and_its_understanding_prompt(setup):
    config, tok, batch, _ = setup
    d = config.data
    assert sorted(batch) == ["recon_images", "recon_mask", "recon_tokens"]
    assert batch["recon_images"].shape == (4, d.image_size, d.image_size, 3)
    assert batch["recon_tokens"].shape == (4, d.recon_seq_len)
    # Every row: the understanding prompt of RecA's instruction (or, dropped for CFG, of the
    # unconditional prompt), with one slot per image token.
    prompt = text.i2t_prompt_ids(tok, text.RECON_INSTRUCTION, d.num_image_tokens)
    dropped = text.i2t_prompt_ids(tok, text.UNCOND_PROMPT, d.num_image_tokens)
    for tokens, mask in zip(np.asarray(batch["recon_tokens"]), np.asarray(batch["recon_mask"])):
        ids = tokens[mask.astype(bool)].tolist()
        assert ids in (prompt, dropped) and ids.count(tok.image_id) == d.num_image_tokens
    # Dropout keyed by stream position, at data.cfg_drop_prob.
    encode = pipeline.example_encoder(d, tok, "recon", pipeline.task_source(d, "recon")[1])
    rows = [encode((pos, pos))["recon_tokens"] for pos in range(400)]
    share = np.mean([r[:len(dropped)].tolist() == dropped for r in rows])
    assert abs(share - d.cfg_drop_prob) < 0.05, share


def test_instructions_come_from_a_file_one_drawn_per_example(setup, tmp_path):
    config, tok, _, _ = setup
    d = resolve.thaw(config).data
    instructions = [text.LONG_CAPTION_Q, text.SHORT_CAPTION_Q, text.CAPTION_Q]
    lines, as_json = tmp_path / "instructions.txt", tmp_path / "instructions.json"
    lines.write_text("\n".join(instructions) + "\n\n")
    as_json.write_text(json.dumps(instructions))
    item_fn = pipeline.task_source(d, "recon")[1]
    prompts = [text.i2t_prompt_ids(tok, q, d.num_image_tokens) for q in (*instructions, text.UNCOND_PROMPT)]
    rows = {}
    for path in (lines, as_json):
        d.recon_instructions = str(path)
        encode = pipeline.example_encoder(d, tok, "recon", item_fn)
        rows[path] = [encode((pos, pos)) for pos in range(120)]
        seen = [prompts.index(r["recon_tokens"][r["recon_mask"].astype(bool)].tolist()) for r in rows[path]]
        assert set(seen) == {0, 1, 2, 3}, seen   # every instruction, and the dropped prompt
    for a, b in zip(rows[lines], rows[as_json]):   # both formats, the same draws
        np.testing.assert_array_equal(a["recon_tokens"], b["recon_tokens"])

    lines.write_text(text.LONG_CAPTION_Q + "\n" + " ".join(["detail"] * 40) + "\n")
    d.recon_instructions = str(lines)
    need = len(text.i2t_prompt_ids(tok, " ".join(["detail"] * 40), 0))
    with pytest.raises(ValueError, match=rf"data.recon_text_len={d.recon_seq_len - d.num_image_tokens} is too "
                                         rf"short: .* set data.recon_text_len >= {need}$"):
        pipeline.example_encoder(d, tok, "recon", item_fn)
    for content, why in (("", "holds no instruction"), ('["a", 3]', "must hold non-empty strings"),
                         ("[oops", "not a JSON list")):
        lines.write_text(content)
        with pytest.raises(ValueError, match=why):
            pipeline.example_encoder(d, tok, "recon", item_fn)
    d.recon_instructions = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="missing.txt.*cannot read it"):
        pipeline.example_encoder(d, tok, "recon", item_fn)


def test_recon_loss_is_the_generation_loss_after_the_images_own_embeddings(setup):
    config, _, batch, params = setup
    m, rng = config.model, jax.random.key(3)
    toks = step_lib.batch_image_tokens(initial_tokenizer_params(config, rng), m, batch, "recon")
    # Every row's image slots sit at the same place: right after the chat template's head.
    first = int(np.argmax(np.asarray(batch["recon_tokens"][0]) == config.data.image_token_id))
    loss, metrics = jax.jit(functools.partial(step_lib.recon_loss, model_cfg=m, image_id=config.data.image_token_id,
                                              grad_scale=0.1))(params, batch=batch, img_tokens=toks, rng=rng)

    @jax.jit
    def by_hand(params):
        # The pieces, composed here as RecA's recon_loss does: the prompt's image slots take the
        # unmasked image's MAR-encoder features through proj_in; then MAR's generation loss.
        k_enc, k_gen = jax.random.split(rng)
        b, seq, dim = toks.shape
        _, z_img = harmon.visual_features(params, m, toks, *harmon.full_visibility(b, seq), k_enc)
        embeds = qwen2.embed(params["llm"], m.llm, batch["recon_tokens"])
        embeds = embeds.at[:, first:first + z_img.shape[1]].set(z_img)
        k_mask, k_diff = jax.random.split(k_gen)
        mask, idx, valid, _ = mar.training_mask(k_mask, b, seq, m.mar.mask_ratio_min, std=m.mar.mask_ratio_std,
                                                per_example=m.mar.mask_ratio_per_example, dist=m.mar.mask_ratio_dist,
                                                full_prob=m.mar.mask_full_prob)
        z = harmon.decoder_condition(params, m, embeds, batch["recon_mask"], toks, idx, valid,
                                     dropout_rng=jax.random.fold_in(k_gen, 2))
        diff = gaussian_diffusion.diffusion_loss(params["head"], harmon.head_config(m), m.diffusion,
                                                 toks.reshape(-1, dim), z.reshape(b * seq, -1), mask.reshape(-1),
                                                 k_diff)
        return diff + m.readout_weight * harmon.readout_loss(params, z, toks, mask), diff

    want, want_diff = by_hand(params)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["recon_loss"]), float(want_diff), rtol=1e-6)
    assert set(metrics) == {"recon_loss", "recon_mask_ratio", "recon_readout_loss"}


def test_gradient_reaches_the_understanding_path_scaled_by_its_factor(setup):
    """The loss's gradient is linear in the scale s of the condition path: g(s) = g(0) +
    s (g(1) - g(0)). The MAR encoder also encodes the visible tokens of the generation pass,
    which g(0) holds; the rest is the understanding embeddings' share, times s."""
    config, _, batch, params = setup
    m, rng = config.model, jax.random.key(4)
    toks = step_lib.batch_image_tokens(initial_tokenizer_params(config, rng), m, batch, "recon")

    @functools.partial(jax.jit, static_argnums=1)
    def grad(params, scale):
        return jax.grad(lambda p: step_lib.recon_loss(p, m, batch, toks, config.data.image_token_id, scale,
                                                      rng)[0])(params)

    g0, g1, g_tenth = grad(params, 0.0), grad(params, 1.0), grad(params, 0.1)
    for name in ("mar", "proj_in"):
        a = jax.tree.leaves(g_tenth[name])
        b = jax.tree.leaves(jax.tree.map(lambda x, y: x + 0.1 * (y - x), g0[name], g1[name]))
        cond = jax.tree.leaves(jax.tree.map(lambda x, y: y - x, g0[name], g1[name]))
        assert max(float(jnp.abs(c).max()) for c in cond) > 0, name   # the condition path has a gradient
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                       atol=1e-6 * max(float(jnp.abs(y).max()), 1e-12))


@pytest.mark.slow
def test_sharded_recon_step_equals_one_device(setup):
    """Two steps of the reconstruction-only mix on (data 2, fsdp 2, tensor 2) equal one device,
    and every path the task crosses moves: the LLM, the MAR encoder (the prompt's embeddings
    and the visible tokens), proj_in, the decoder side and the head."""
    config, _, batch, _ = setup
    results = []
    for shape in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:1] if shape == {"data": 1} else None)
        state = create_train_state(config, mesh, jax.random.key(0))
        start = jax.tree.map(np.asarray, state.params)
        step = step_lib.jit_train_step(config, mesh, state_shardings(state), batch)
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(2):
                state, metrics = step(state, batch, jax.random.key(1))
                losses.append(float(metrics["loss"]))
        results.append((start, jax.tree.map(np.asarray, state.params), losses, jax.device_get(metrics)))
    (start, one, losses_one, metrics), (_, eight, losses_eight, _) = results
    assert set(metrics) >= {"recon_loss", "recon_mask_ratio"} and "t2i_loss" not in metrics
    np.testing.assert_allclose(losses_eight, losses_one, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(b, a, atol=5e-5, rtol=1e-4)   # reduction order differs across shardings
    for group in ("llm", "mar", "proj_in", "proj_out", "head"):
        moved = jax.tree.leaves(jax.tree.map(lambda x, y: not np.array_equal(x, y), start[group], one[group]))
        assert any(moved), group


def test_task_mix_that_trains_nothing_is_one_clear_error():
    config = config_utils.load_config("configs/harmon.py:tiny")
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    config.train.i2t_weight = config.train.t2i_weight = config.train.plan_weight = 0.0
    with pytest.raises(ValueError, match=r"no task trains \(i2t: batch 8 x weight 0, t2i: batch 16 x weight 0, "
                                         r"recon: batch 0 x weight 1, plan: batch 4 x weight 0\)"):
        resolve.check_batch_sizes(config, mesh)
    config.data.recon_batch_size = 2        # reconstruction alone trains
    resolve.check_batch_sizes(config, mesh)
    config.train.recon_weight = -1.0
    with pytest.raises(ValueError, match=r"train.recon_weight=-1.0: expected >= 0"):
        resolve.check_batch_sizes(config, mesh)
    config.train.recon_weight = 1.0
    config.data.recon_batch_size = 3
    with pytest.raises(ValueError, match=r"data.recon_batch_size=3 is not divisible by the data-parallel size 2"):
        resolve.check_batch_sizes(config, sharding.make_mesh({"data": 2}, devices=jax.devices()[:2]))


@pytest.mark.parametrize("variant", ["tiny", "0.5b", "1.5b"])
def test_reca_configs_change_the_task_mix_and_optimizer_only(variant):
    config = config_utils.load_config(f"configs/reca.py:{variant}")
    harmon_config = config_utils.load_config(f"configs/harmon.py:{variant}")
    assert config.model == harmon_config.model
    d, t = config.data, config.train
    assert d.t2i_batch_size == 0 and d.recon_batch_size == d.i2t_batch_size > 0
    resolve.check_batch_sizes(config, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    if variant != "tiny":   # RecA's code: 2 + 2 micro-batches of 48 (1.5B) / 96 (0.5B), lr 1e-5, no EMA
        assert d.recon_batch_size == {"1.5b": 96, "0.5b": 192}[variant]
        assert (t.recon_weight, t.i2t_weight, t.t2i_weight) == (0.5, 0.5, 0.0)
        o = config.optimizer
        assert (o.lr, o.final_lr_fraction, t.ema_decay, t.steps) == (1e-5, 0.0, 0.0, 12500)
        assert d.recon_square == "stretch"


def test_stretch_resizes_the_whole_image_to_the_square():
    from unimm.data import images
    img = np.zeros((4, 8, 3), np.uint8)
    img[:, :4] = (255, 0, 0)
    img[:, 4:] = (0, 0, 255)
    out = images.to_square(img, 8, "stretch")
    assert out.shape == (8, 8, 3)
    assert (out[:, :3] == (255, 0, 0)).all() and (out[:, 5:] == (0, 0, 255)).all()   # nothing cut, nothing padded


def test_image_variation_draws_from_the_images_own_embeddings(setup):
    from unimm.data import shapes
    from unimm.inference.model import Model
    config, tok, _, params = setup
    config = resolve.thaw(config)
    config.sample.num_iter, config.sample.num_sampling_steps = 2, "3"
    # Fresh params draw gray (zero-initialised adaLN and output layers): perturb every one.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    model = Model(config, tok, params, initial_tokenizer_params(config, jax.random.key(0)))
    size = config.data.image_size
    a = [shapes.render(shapes.sample_scene(0, i), size) for i in range(2)]
    b = [np.full_like(a[0], 255), a[1]]
    out_a, out_b = (model.reconstruct(x, jax.random.key(0)) for x in (a, b))
    assert out_a.shape == (2, size, size, 3) and out_a.dtype == np.uint8
    # Same draws (the rng), another first image: only the first redraw changes.
    assert not np.array_equal(out_a[0], out_b[0])
    np.testing.assert_array_equal(out_a[1], out_b[1])
