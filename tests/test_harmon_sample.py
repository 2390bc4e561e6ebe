"""Harmon inference programs: MAR sampling loop and captioning."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import config_utils
from unimm.models import harmon, harmon_sample, layers, qwen2

from tiny import one_block_each   # tests/tiny.py


@pytest.fixture(scope="module")
def tiny():
    """Perturbed params: the head's zero-initialised final layer makes a fresh x0 head (tiny's)
    draw all-zero tokens whatever the prompt, which would hide an unfilled or mixed-up slot.
    Pixel tokens: x0 clipped to [-1, 1], the scale of the float-rounding tolerances below (the
    patch code's +-6.5 lets 100 steps at CFG 3 of random weights grow rounding to ~2e-4)."""
    cfg = layers.freeze(one_block_each(config_utils.load_config("configs/harmon.py:tiny,pixel_tokens")).model)
    # The jitted init is other tests' too (the session's compilation cache); the noise is
    # added on the host (a jitted init + noise compiled 3x longer, eager adds one op per shape).
    params = jax.jit(harmon.init, static_argnums=0)(cfg, jax.random.key(0))
    rng = np.random.default_rng(1)
    return cfg, jax.tree.map(lambda x: np.asarray(x) + rng.normal(0.0, 0.02, x.shape).astype(x.dtype), params)


@pytest.mark.parametrize("num_iter,seq", [(16, 64), (64, 256), (4, 16), (1, 9)])
def test_mask_schedule_predicts_every_token_once(num_iter, seq):
    after, cfg_len = harmon_sample.mask_schedule(num_iter, seq)
    before = np.concatenate([[seq], after[:-1]])
    counts = before - after
    assert after[-1] == 0 and counts.sum() == seq and (counts >= 1).all()
    assert (cfg_len >= 1).all()


def prompts(cfg, b, t=7):
    tokens = jax.random.randint(jax.random.key(5), (b, t), 10, cfg.llm.vocab_size)
    mask = jnp.ones((b, t), jnp.int32).at[1, :2].set(0)        # one left-padded row
    return tokens, mask


def test_generation_fills_every_token_and_compiles_once(tiny):
    cfg, params = tiny
    tokens, mask = prompts(cfg, 4)
    kw = dict(num_iter=6, guided=True, cfg_scale=3.0, num_steps="5")
    img = harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(1), **kw)
    assert img.shape == (2, cfg.mar.grid ** 2, cfg.mar.token_dim)
    assert np.isfinite(np.asarray(img)).all() and (np.asarray(img) != 0).all()
    size = harmon_sample.generate_image_tokens._cache_size()
    again = harmon_sample.generate_image_tokens(params, cfg, tokens[::-1], mask[::-1], jax.random.key(2),
                                                **{**kw, "cfg_scale": 2.0})
    assert harmon_sample.generate_image_tokens._cache_size() == size     # no recompilation
    assert not np.allclose(np.asarray(again), np.asarray(img))
    same = harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(1), **kw)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(img))


def test_window_groups_minimize_the_sampler_work():
    """Groups cover the iterations in order; each takes its largest window (tokens to draw)
    and visible count (tokens drawn); a group is added only where it saves its overhead."""
    counts, visible = [1, 1, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 5, 8, 11, 16]
    work = lambda g, rc: sum((j - i) * (rc * w + k) for i, j, w, k in g)
    for k in (1, 2, 3, 8):
        groups = harmon_sample.window_groups(counts, visible, k, 10.0, overhead=0.0)
        assert len(groups) <= k and groups[0][0] == 0 and groups[-1][1] == len(counts)
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        assert all(w == max(counts[i:j]) and v == max(1, visible[j - 1]) for i, j, w, v in groups)
    one = harmon_sample.window_groups(counts, visible, 1, 10.0)
    assert one == [(0, 8, 6, 16)] and work(one, 10.0) == 8 * 76
    # Head rows dominate (row cost 10): two groups split where the windows jump.
    assert harmon_sample.window_groups(counts, visible, 2, 10.0, overhead=0.0) == [(0, 6, 3, 8), (6, 8, 6, 16)]
    every = harmon_sample.window_groups(counts, visible, 8, 10.0, overhead=0.0)
    assert work(every, 10.0) == sum(10 * c + max(1, v) for c, v in zip(counts, visible))
    # Equal iterations never split; a large overhead keeps one group.
    assert harmon_sample.window_groups([1] * 9, [0] * 9, 4, 10.0) == [(0, 9, 1, 1)]
    assert len(harmon_sample.window_groups(counts, visible, 8, 10.0, overhead=1.0)) == 1


def test_window_sizes_draw_the_same_image(tiny):
    """Iterations grouped under smaller windows and visible counts (``max_windows``) draw what
    one group of the largest sizes draws: a token's noise does not depend on its window, and
    the encoder's and the LLM's padding rows are masked (to float rounding)."""
    cfg, params = tiny
    tokens, mask = prompts(cfg, 4)
    kw = dict(num_iter=4, guided=True, cfg_scale=3.0, num_steps="100")
    after, _ = harmon_sample.mask_schedule(4, 9)
    before = np.concatenate([[9], after[:-1]])
    cost = harmon_sample.head_row_cost(cfg, 100)
    groups = harmon_sample.window_groups(before - after, 9 - before, 3, cost)
    assert groups == [(0, 1, 1, 1), (1, 2, 2, 1), (2, 4, 3, 6)]
    one = harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(6), **kw)
    grouped = harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(6), max_windows=3, **kw)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(one), atol=1e-5, rtol=1e-5)


def test_diffusion_step_annealing(tiny):
    """DiSA (``final_steps``): the steps fall linearly over the iterations; at one count for
    every iteration it draws what the fixed-step sampler draws (same keys, same tables; to
    float rounding, as XLA folds the fixed sampler's constant tables), and annealed it draws
    other, finite tokens."""
    from unimm.models import gaussian_diffusion as gd
    assert gd.annealed_steps(64, 50, 5)[:3] == (50, 49, 49) and gd.annealed_steps(64, 50, 5)[-1] == 5
    assert all(a >= b for a, b in zip(gd.annealed_steps(9, 25, 5), gd.annealed_steps(9, 25, 5)[1:]))
    assert gd.annealed_steps(1, 25, 5) == (25,)
    with pytest.raises(ValueError, match=r"from the first iteration's plain step count \('5'\) down to at least 2"):
        gd.annealed_steps(4, 5, 6)
    with pytest.raises(ValueError, match=r"plain step count \('ddim25'\)"):
        gd.annealed_steps(4, "ddim25", 5)
    assert gd.annealed_steps(3, "25", 5) == (25, 15, 5)
    cfg, params = tiny
    tokens, mask = prompts(cfg, 4)
    kw = dict(num_iter=4, guided=True, cfg_scale=3.0, cfg_schedule="linear", num_steps="6")
    fixed = harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(4), **kw)
    same = harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(4), final_steps=6, **kw)
    np.testing.assert_allclose(np.asarray(same), np.asarray(fixed), atol=1e-5, rtol=1e-5)
    annealed = np.asarray(harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(4),
                                                              final_steps=2, **kw))
    assert np.isfinite(annealed).all() and not np.allclose(annealed, np.asarray(fixed))
    with pytest.raises(ValueError, match="records no trajectory"):
        harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(4), final_steps=2,
                                            record=True, **kw)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_guidance_scale_one_equals_unguided(tiny, schedule):
    cfg, params = tiny
    tokens, mask = prompts(cfg, 4)
    kw = dict(num_iter=5, num_steps="4", cfg_schedule=schedule)
    guided = harmon_sample.generate_image_tokens(params, cfg, tokens, mask, jax.random.key(3),
                                                 guided=True, cfg_scale=1.0, **kw)
    plain = harmon_sample.generate_image_tokens(params, cfg, tokens[:2], mask[:2], jax.random.key(3),
                                                guided=False, **kw)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_caption_decodes_with_image_slots(tiny):
    cfg, params = tiny
    n_img = cfg.mar.grid ** 2 + cfg.mar.buffer_size
    image_id = 3
    rows = [[1, 2] + [image_id] * n_img + [7, 8, 9], [1] + [image_id] * n_img + [7, 8]]
    width = max(map(len, rows))
    tokens = np.array([[0] * (width - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
    img = jax.random.normal(jax.random.key(4), (2, cfg.mar.grid ** 2, cfg.mar.token_dim))
    out = harmon_sample.caption(params, cfg, tokens, mask, img, image_id, max_new_tokens=5, eos_id=-1)
    assert out.shape == (2, width + 5)
    np.testing.assert_array_equal(np.asarray(out[:, :width]), tokens)
    # Same tokens as a cache-free greedy loop over the full embedding sequence.
    # (jitted: eager, every op of every length would compile on its own)
    embed = jax.jit(lambda p, t, x: harmon.understanding_embeds(p, cfg, t, x, image_id))
    embeds = embed(params, jnp.asarray(tokens), img)

    @jax.jit
    def greedy_next(llm, seq, m):
        hidden, _ = qwen2.forward(llm, cfg.llm, seq, qwen2.positions_from_mask(m), m)
        nxt = jnp.argmax(qwen2.lm_logits(llm, cfg.llm, hidden[:, -1]), -1)
        return nxt, jnp.concatenate([seq, qwen2.embed(llm, cfg.llm, nxt[:, None])], 1)

    seq, m, want = embeds, jnp.asarray(mask), []
    for _ in range(5):
        nxt, seq = greedy_next(params["llm"], seq, m)
        want.append(np.asarray(nxt))
        m = jnp.concatenate([m, jnp.ones((2, 1), m.dtype)], 1)
    np.testing.assert_array_equal(np.asarray(out[:, width:]), np.stack(want, 1))
    # The image reaches the LLM: its slots carry image embeddings, text slots do not change.
    other = embed(params, jnp.asarray(tokens), -img)
    is_img = tokens == image_id
    assert not np.allclose(np.asarray(other)[is_img], np.asarray(embeds)[is_img])
    np.testing.assert_array_equal(np.asarray(other)[~is_img], np.asarray(embeds)[~is_img])


def test_readout_residual_samples_add_the_readout_back(tiny):
    """With ``readout_residual`` the head draws ``token - readout(z)``: a readout that maps
    every z to the same vector v moves every sampled token by exactly v (guided: u + s(c - u)
    = v), and the head is trained on the residual."""
    plain, params = tiny
    assert not plain.readout_residual
    model = one_block_each(config_utils.load_config("configs/harmon.py:tiny,pixel_tokens")).model
    model.readout_residual = True
    cfg = layers.freeze(model)
    v = jnp.linspace(-0.5, 0.5, cfg.mar.token_dim)
    const = {**params, "readout": {"kernel": jnp.zeros_like(params["readout"]["kernel"]), "bias": v}}
    tokens, mask = prompts(cfg, 4)
    # One iteration: every token is drawn from the same all-masked condition in both runs.
    kw = dict(num_iter=1, guided=True, cfg_scale=3.0, num_steps="4")
    shifted = harmon_sample.generate_image_tokens(const, cfg, tokens, mask, jax.random.key(3), **kw)
    base = harmon_sample.generate_image_tokens(const, plain, tokens, mask, jax.random.key(3), **kw)
    np.testing.assert_allclose(np.asarray(shifted - base), np.broadcast_to(v, base.shape), atol=1e-5)
    z = jax.random.normal(jax.random.key(4), (2, 5, cfg.mar.decoder_width))
    toks = jax.random.normal(jax.random.key(5), (2, 5, cfg.mar.token_dim))
    np.testing.assert_allclose(np.asarray(harmon.head_target(params, cfg, z, toks)),
                               np.asarray(toks - harmon.readout(params, z)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(harmon.head_target(params, plain, z, toks)), np.asarray(toks))
    with pytest.raises(ValueError, match="readout_residual=True needs the readout"):
        model.readout_weight = 0.0
        harmon.validate(model)
