"""Diffusion head and Gaussian diffusion: formulas in float64, torch parity, sampler properties."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from configs.harmon import get_config, sharding_config
from unimm.convert import mar_torch
from unimm.convert.common import CheckpointMismatchError
from unimm.models import diffusion_head as dh
from unimm.models import gaussian_diffusion as gd
from unimm.models import layers

D, C = 6, 12                               # token channels, condition width
HEAD = ml_collections.ConfigDict(dict(width=32, depth=2, token_dim=D, cond_dim=C, dtype="float32"))
DIFF = get_config("tiny").model.diffusion            # 1000 steps, cosine, x0 clamp 1.0
DIFF.num_sampling_steps, DIFF.batch_mul = "10", 4   # fixed here: the tests' figures assume them
DIFF.prediction, DIFF.clip_log_variance = "epsilon", False   # MAR's sampler (tiny's own: below)


@pytest.fixture(scope="module")
def fresh():
    return layers.init_params(dh.DiffusionHead, HEAD, jax.random.key(0))


@pytest.fixture(scope="module")
def head(fresh):
    """Non-trivial params: the zero-initialised adaLN / final layer would hide bugs."""
    rs = np.random.RandomState(1)
    return jax.tree.map(lambda x: jnp.asarray(x + 0.1 * rs.randn(*x.shape).astype(np.float32)), fresh)


# --------------------------------------------------------------------------------- head


def test_head_init(fresh):
    for leaf in jax.tree.leaves(fresh["final_layer"]) + jax.tree.leaves(fresh["res_blocks"][0]["adaLN_modulation_1"]):
        assert not np.any(leaf)
    assert abs(float(jnp.std(fresh["time_embed"]["mlp_0"]["kernel"])) - 0.02) < 0.004
    out = dh.apply(fresh, HEAD, jnp.ones((3, D)), jnp.array([0, 5, 999]), jnp.ones((3, C)))
    assert out.shape == (3, 2 * D) and not np.any(out)    # zero final layer
    rules = {name for name, _ in sharding_config().logical_axis_rules}
    specs = jax.tree.leaves(layers.logical_specs(dh.DiffusionHead, HEAD),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert {n for spec in specs for n in spec if n is not None} <= rules


@torch.no_grad()
def _t_head(sd, x, t, c):
    """SimpleMLPAdaLN.forward from a state dict."""
    lin = lambda h, n: F.linear(h, sd[n + ".weight"], sd[n + ".bias"])  # noqa: E731
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "time_embed.mlp.0")), "time_embed.mlp.2")
    y = temb + lin(c, "cond_embed")
    x = lin(x, "input_proj")
    w = x.shape[-1]
    for i in range(HEAD.depth):
        p = f"res_blocks.{i}."
        shift, scale, gate = lin(F.silu(y), p + "adaLN_modulation.1").chunk(3, -1)
        h = F.layer_norm(x, (w,), sd[p + "in_ln.weight"], sd[p + "in_ln.bias"], 1e-6) * (1 + scale) + shift
        x = x + gate * lin(F.silu(lin(h, p + "mlp.0")), p + "mlp.2")
    shift, scale = lin(F.silu(y), "final_layer.adaLN_modulation.1").chunk(2, -1)
    return lin(F.layer_norm(x, (w,), eps=1e-6) * (1 + scale) + shift, "final_layer.linear").numpy()


def test_head_matches_torch_and_round_trips(head):
    sd = mar_torch.head_to_torch(head, HEAD)
    assert {"time_embed.mlp.0.weight", "time_embed.mlp.2.bias", "cond_embed.weight", "input_proj.bias",
            "res_blocks.1.adaLN_modulation.1.weight", "res_blocks.0.in_ln.weight", "res_blocks.0.mlp.2.weight",
            "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"} <= set(sd)
    assert not any("norm_final" in k for k in sd)
    back = mar_torch.head_from_torch(sd, HEAD)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(head)):
        np.testing.assert_array_equal(a, np.asarray(b))
    rs = np.random.RandomState(2)
    x, c = rs.randn(5, D).astype(np.float32), rs.randn(5, C).astype(np.float32)
    t = np.array([0, 1, 17, 500, 999])
    ref = _t_head({k: torch.tensor(v) for k, v in sd.items()}, torch.tensor(x), torch.tensor(t), torch.tensor(c))
    np.testing.assert_allclose(dh.apply(back, HEAD, x, t, c), ref, atol=1e-5, rtol=1e-5)


def test_conditioned_head_equals_apply(head):
    """The sampler's head (condition embedded once, adaLN kernels joined) is the head."""
    rs = np.random.RandomState(3)
    x, c = rs.randn(5, D).astype(np.float32), rs.randn(5, C).astype(np.float32)
    fn = jax.jit(lambda x, t: dh.conditioned(head, HEAD, c)(x, t))
    t = np.array([0, 1, 17, 500, 999])
    np.testing.assert_allclose(fn(x, t), dh.apply(head, HEAD, x, t, c), atol=1e-6, rtol=1e-5)
    one = fn(x, np.int32(17))             # one timestep for every row, embedded once
    assert one.shape == (5, 2 * D)
    np.testing.assert_allclose(one, dh.apply(head, HEAD, x, np.full(5, 17), c), atol=1e-6, rtol=1e-5)
    # A sampler's form: every step's adaLN outputs computed up front, each step looked up.
    steps = np.array([0, 17, 500, 999])
    tabled = jax.jit(lambda x, t: dh.conditioned(head, HEAD, c, timesteps=steps)(x, t))
    for t_step in steps:
        np.testing.assert_allclose(tabled(x, np.int32(t_step)), dh.apply(head, HEAD, x, np.full(5, t_step), c),
                                   atol=1e-6, rtol=1e-5)
    # Training's form: the condition tiled 3 times, 15 timesteps looked up in a table of 20.
    tiled = jax.jit(lambda x, t: dh.conditioned(head, HEAD, c, tile=3, time_table=20)(x, t))
    x3, t3 = np.tile(x, (3, 1)) + 0.5, rs.randint(0, 20, 15)
    np.testing.assert_allclose(tiled(x3, t3), dh.apply(head, HEAD, x3, t3, np.tile(c, (3, 1))),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("edit,name", [
    (lambda sd: sd.pop("time_embed.mlp.2.weight"), "time_embed.mlp.2.weight"),
    (lambda sd: sd.update({"res_blocks.5.in_ln.weight": np.zeros(32)}), "res_blocks.5.in_ln.weight"),
    (lambda sd: sd.update({"input_proj.weight": np.zeros((32, 7))}), "input_proj.weight"),
])
def test_head_mismatch_names_the_key(head, edit, name):
    sd = mar_torch.head_to_torch(head, HEAD)
    edit(sd)
    with pytest.raises(CheckpointMismatchError, match=name.replace(".", r"\.")):
        mar_torch.head_from_torch(sd, HEAD)


# ----------------------------------------------------------------------------- schedule


def _recipe_space(num_timesteps, counts):
    """guided-diffusion space_timesteps, re-stated."""
    counts = [int(c) for c in counts.split(",")]
    size_per, extra = num_timesteps // len(counts), num_timesteps % len(counts)
    out, start = [], 0
    for i, n in enumerate(counts):
        size = size_per + (i < extra)
        stride, cur = (1 if n <= 1 else (size - 1) / (n - 1)), 0.0
        for _ in range(n):
            out.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(out))


def _recipe_tables(respacing=""):
    """float64 tables of create_diffusion(respacing, 'cosine') computed from the formulas."""
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    i = np.arange(1000)
    betas = np.minimum(1 - f((i + 1) / 1000) / f(i / 1000), 0.999)
    acp = np.cumprod(1 - betas)
    keep = _recipe_space(1000, respacing) if respacing else list(range(1000))
    new_betas = 1 - acp[keep] / np.append(1.0, acp[keep][:-1])
    return np.array(keep), new_betas


@pytest.mark.parametrize("respacing", ["", "100", "10", "25,50"])
def test_schedule_matches_guided_diffusion_recipe(respacing):
    s = gd.make_schedule(1000, respacing)
    keep, betas = _recipe_tables(respacing)
    np.testing.assert_array_equal(s.timestep_map, keep)
    np.testing.assert_allclose(s.betas, betas, rtol=1e-10, atol=1e-13)
    assert s.num_timesteps == len(keep)
    if respacing == "100":
        assert len(keep) == 100 and keep[0] == 0 and keep[-1] == 999
        assert sorted(gd.space_timesteps(1000, "100")) == list(keep)
    if respacing == "":   # the clip is active at the end of the cosine schedule (not after respacing)
        assert s.betas.max() == 0.999 and np.isclose(s.betas[-1], 0.999)


# ----------------------------------------------------------------------------- training


def _np_eps_fn(x, t):
    return np.concatenate([0.3 * x + 1e-3 * t[:, None], 0.9 * np.tanh(x)], -1)


def _np_training_loss(x0, t, noise):
    """The MSE + VLB loss of guided-diffusion, written out in float64."""
    _, betas = _recipe_tables("")
    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))[t][:, None]
    c1 = (betas * np.sqrt(acp_prev) / (1 - acp))[t][:, None]
    c2 = ((1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp))[t][:, None]
    a = acp[t][:, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    out = _np_eps_fn(x_t, t)
    eps, v = out[:, :D], out[:, D:]
    frac = (v + 1) / 2
    logvar = frac * np.log(betas)[t][:, None] + (1 - frac) * post_logvar
    pred_x0 = np.sqrt(1 / a) * x_t - np.sqrt(1 / a - 1) * eps
    mean = c1 * pred_x0 + c2 * x_t
    true_mean = c1 * x0 + c2 * x_t
    kl = 0.5 * (-1 + logvar - post_logvar + np.exp(post_logvar - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
    cdf = lambda y: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))  # noqa: E731
    inv = np.exp(-0.5 * logvar)
    cp, cm = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(cp, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - cm, 1e-12)), np.log(np.maximum(cp - cm, 1e-12))))
    vb = np.where(t == 0, -logp.mean(-1), kl.mean(-1)) / np.log(2)
    return ((noise - eps) ** 2).mean(-1) + vb


def test_training_loss_matches_float64_formulas():
    rs = np.random.RandomState(3)
    t = np.array([0, 0, 1, 10, 250, 500, 998, 999])
    x0 = rs.uniform(-1.2, 1.2, (len(t), D))           # some values beyond +-0.999 (edge bins)
    x0[0, :3] = [-1.0, 1.0, 0.0]
    noise = rs.randn(len(t), D)
    eps_fn = lambda x, tt: jnp.concatenate([0.3 * x + 1e-3 * tt[:, None], 0.9 * jnp.tanh(x)], -1)  # noqa: E731
    ours = jax.jit(lambda *a: gd.training_loss(eps_fn, *a))(
        jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    ref = _np_training_loss(x0, t, noise)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-5)

    # The VLB trains the variance only: d loss / d (eps scale) is the MSE's gradient.
    def loss(a, with_vb):
        fn = lambda x, tt: jnp.concatenate([a * x, 0.9 * jnp.tanh(x)], -1)  # noqa: E731
        full = gd.training_loss(fn, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
        s = gd.make_schedule()
        x_t = gd.q_sample(s, jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
        return jnp.sum(full if with_vb else jnp.mean((noise - a * x_t) ** 2, -1))
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_allclose(grad(0.3, True), grad(0.3, False), rtol=1e-5)


def test_diffusion_loss_is_a_masked_mean(head):
    rs = np.random.RandomState(4)
    target, z = jnp.asarray(rs.randn(5, D), jnp.float32), jnp.asarray(rs.randn(5, C), jnp.float32)
    mask = jnp.array([1, 0, 1, 1, 0])
    f = jax.jit(lambda p, tg, zz, m, k: gd.diffusion_loss(p, HEAD, DIFF, tg, zz, m, k))
    loss = f(head, target, z, mask, jax.random.key(0))
    assert np.isfinite(float(loss)) and float(loss) > 0
    # Unmasked tokens do not count.
    moved = f(head, target.at[1].set(50.0), z.at[4].set(9.0), mask, jax.random.key(0))
    np.testing.assert_allclose(moved, loss, rtol=1e-6)
    # The same value from batch_mul explicit copies, t and noise drawn as the function does.
    k_t, k_n = jax.random.split(jax.random.key(0))
    t = jax.random.randint(k_t, (5 * DIFF.batch_mul,), 0, 1000)
    noise = jax.random.normal(k_n, (5 * DIFF.batch_mul, D))
    tiled = jnp.tile(z, (DIFF.batch_mul, 1))
    per = jax.jit(lambda p, *a: gd.training_loss(lambda x, tt: dh.apply(p, HEAD, x, tt, tiled), *a))(
        head, jnp.tile(target, (DIFF.batch_mul, 1)), t, noise)
    m = jnp.tile(mask, DIFF.batch_mul)
    np.testing.assert_allclose(loss, jnp.sum(per * m) / jnp.sum(m), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: f(p, target, z, mask, jax.random.key(0))))(head)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["input_proj"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("counts", [(5, 6, 4), (5, 7, 6), (8, 3, 2)])
def test_diffusion_loss_on_kept_rows_is_the_whole_loss(head, counts):
    """``row_sizes``: the head runs on each example's weighted tokens only, in the smallest
    static size that holds them; loss and gradients are those of every token computed (and
    of MAR's explicit copies), timesteps looked up in a table (more rows than 40 steps)."""
    b, n_tok, sizes = 3, 8, (6, 7, 8)
    diff = ml_collections.ConfigDict(dict(DIFF))
    diff.num_timesteps = 40
    rs = np.random.RandomState(11)
    target = jnp.asarray(rs.randn(b * n_tok, D), jnp.float32)
    z = jnp.asarray(rs.randn(b * n_tok, C), jnp.float32)
    w = np.zeros((b, n_tok), np.float32)
    for i, k in enumerate(counts):
        w[i, rs.permutation(n_tok)[:k]] = rs.uniform(0.5, 2.0, k)
    w = jnp.asarray(w.reshape(-1))
    loss = jax.jit(jax.value_and_grad(
        lambda p, rows: gd.diffusion_loss(p, HEAD, diff, target, z, w, jax.random.key(2), row_sizes=rows)),
        static_argnums=1)
    (kept, g_kept), (every, g_every) = loss(head, sizes), loss(head, ())
    k_t, k_n = jax.random.split(jax.random.key(2))
    mul = diff.batch_mul
    t = jax.random.randint(k_t, (b * n_tok * mul,), 0, 40)
    noise = jax.random.normal(k_n, (b * n_tok * mul, D))
    s = gd.make_schedule(40, "", diff.noise_schedule)

    def explicit(p):
        per = gd.training_loss(lambda x, tt: dh.apply(p, HEAD, x, tt, jnp.tile(z, (mul, 1))),
                               jnp.tile(target, (mul, 1)), t, noise, s)
        return jnp.sum(per * jnp.tile(w, mul)) / jnp.sum(w) / mul
    ref, g_ref = jax.jit(jax.value_and_grad(explicit))(head)
    np.testing.assert_allclose(kept, ref, rtol=1e-5)
    np.testing.assert_allclose(every, ref, rtol=1e-5)
    for a, e, r in zip(jax.tree.leaves(g_kept), jax.tree.leaves(g_every), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(e, r, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ sampling


def test_sampler_log_probs_are_gaussian_densities(head):
    z = jnp.asarray(np.random.RandomState(5).randn(4, C), jnp.float32)
    tau = 0.8
    x0, lp, traj = gd.sample(head, HEAD, DIFF, z, jax.random.key(1), temperature=tau, return_trajectory=True)
    s = gd.make_schedule(1000, "10")
    assert x0.shape == (4, D) and lp.shape == (s.num_timesteps, 4)
    np.testing.assert_array_equal(traj["t"], np.arange(s.num_timesteps)[::-1])
    np.testing.assert_array_equal(traj["x"][1:], traj["x_next"][:-1])
    np.testing.assert_array_equal(traj["x_next"][-1], x0)
    std = np.exp(0.5 * np.asarray(traj["log_var"], np.float64)) * tau
    ref = stats.norm.logpdf(np.asarray(traj["x_next"], np.float64), np.asarray(traj["mean"], np.float64), std).sum(-1)
    np.testing.assert_allclose(lp[:-1], ref[:-1], rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(lp[-1], 0.0)                          # last step is noiseless
    np.testing.assert_allclose(traj["x_next"][-1], traj["mean"][-1])
    # The recorded means are p_mean_variance of the head at the original-scale timestep.
    k = 3
    out = dh.apply(head, HEAD, traj["x"][k], jnp.full((4,), s.timestep_map[traj["t"][k]]), z)
    p = gd.p_mean_variance(s, out, traj["x"][k], jnp.full((4,), traj["t"][k]), DIFF.clip_denoised)
    # (an untrained head's x0 guess at t=999 is ~1e4: relative tolerances below)
    np.testing.assert_allclose(p["mean"], traj["mean"][k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p["log_variance"], traj["log_var"][k], rtol=1e-5, atol=1e-5)
    # Recomputing the trajectory reproduces the log-probs, and differentiates.
    recompute = jax.jit(lambda p, tr: gd.trajectory_log_probs(p, HEAD, DIFF, z, tr, temperature=tau))
    np.testing.assert_allclose(recompute(head, traj), lp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(recompute(head, jax.tree.map(lambda a: a[2:5], traj)), lp[2:5], rtol=1e-5, atol=1e-4)
    other = jax.tree.map(lambda a: a * 1.1, head)
    assert not np.allclose(recompute(other, traj)[:-1], lp[:-1], atol=1e-2)
    g = jax.jit(jax.grad(lambda p: recompute(p, traj).sum()))(head)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))


def test_perfect_eps_predictor_recovers_x0():
    s = gd.make_schedule(1000, "100")
    acp = gd.make_schedule().alphas_cumprod.astype(np.float32)     # the ORIGINAL process
    x0 = jnp.asarray(np.random.RandomState(6).uniform(-1, 1, (3, D)), jnp.float32)

    def eps_fn(x, t):  # exact noise of x_t = sqrt(acp) x0 + sqrt(1 - acp) eps at original t
        a = jnp.reshape(jnp.asarray(acp)[t], (-1, 1))   # t: one timestep for every row
        return jnp.concatenate([(x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a), jnp.zeros_like(x)], -1)

    x_T = jax.random.normal(jax.random.key(2), x0.shape)
    for tau in (1e-3, 1.0):
        out, lp, traj = gd.sample_loop(eps_fn, s, x_T, jax.random.key(3), tau)
        np.testing.assert_allclose(out, x0, atol=1e-3)
        # Every step's mean is the true posterior mean given x0 (checks the timestep map).
        t = np.asarray(traj["t"])
        true_mean = s.posterior_mean_coef1[t][:, None, None] * np.asarray(x0, np.float64) \
            + s.posterior_mean_coef2[t][:, None, None] * np.asarray(traj["x"], np.float64)
        np.testing.assert_allclose(traj["mean"], true_mean, atol=2e-3)


def test_each_step_draws_its_own_keys_noise():
    """The steps' noise, drawn before the loop in one program, is what each step would draw
    from its own key: step j adds std * normal(split(rng, S)[j]), in both loops."""
    s = gd.make_schedule(1000, "6")
    eps_fn = lambda x, t: jnp.concatenate([0.5 * x, jnp.zeros_like(x)], -1)      # noqa: E731
    x_T = jax.random.normal(jax.random.key(0), (3, D))
    x0, _, traj = gd.sample_loop(eps_fn, s, x_T, jax.random.key(1))
    keys = jax.random.split(jax.random.key(1), s.num_timesteps)
    for j in range(s.num_timesteps - 1):                       # the last step (t = 0) adds none
        std = np.exp(0.5 * np.asarray(traj["log_var"][j]))
        expected = np.asarray(traj["mean"][j]) + std * np.asarray(jax.random.normal(keys[j], (3, D)))
        np.testing.assert_allclose(traj["x_next"][j], expected, rtol=1e-5, atol=1e-6)
    tables = jax.tree.map(jnp.asarray, s)
    np.testing.assert_array_equal(gd.sample_loop_n(eps_fn, tables, jnp.int32(s.num_timesteps), x_T,
                                                   jax.random.key(1)), x0)


def test_sampler_compiles_once_and_cfg(head, monkeypatch):
    traces = []
    real_apply, real_conditioned = dh.apply, dh.conditioned

    def counted(*a, **kw):
        fn = real_conditioned(*a, **kw)
        return lambda x, t: traces.append(1) or fn(x, t)
    monkeypatch.setattr(dh, "conditioned", counted)
    rs = np.random.RandomState(7)
    z_c, z_u = jnp.asarray(rs.randn(3, C), jnp.float32), jnp.asarray(rs.randn(3, C), jnp.float32)

    plain = jax.jit(lambda p, z, k, tau: gd.sample(p, HEAD, DIFF, z, k, temperature=tau))
    a = plain(head, z_c, jax.random.key(4), 1.0)
    b = plain(head, z_c + 1.0, jax.random.key(5), 0.5)
    assert plain._cache_size() == 1 and len(traces) == 1          # one trace of the scan body
    assert not np.allclose(a[0], b[0])

    # guided with scale 1 == unguided on the cond half (same rng -> same noise).
    guided = jax.jit(lambda p, z, k, s: gd.sample(p, HEAD, DIFF, z, k, cfg_scale=s, guided=True))
    zz = jnp.concatenate([z_c, z_u])
    g1 = guided(head, zz, jax.random.key(4), 1.0)
    assert g1[0].shape == (3, D) and g1[1].shape == (10, 3)
    np.testing.assert_allclose(g1[0], a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g1[1], a[1], rtol=1e-5, atol=1e-4)
    g3 = guided(head, zz, jax.random.key(4), 3.0)                  # traced scale: no recompile
    assert guided._cache_size() == 1 and not np.allclose(g3[0], a[0], rtol=1e-3)
    eager = gd.sample(head, HEAD, DIFF, zz, jax.random.key(4), cfg_scale=3.0)
    np.testing.assert_allclose(eager[0], g3[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guided"):
        jax.jit(lambda s: gd.sample(head, HEAD, DIFF, zz, jax.random.key(4), cfg_scale=s))(3.0)

    # Guidance touches the eps channels only; the variance channels are the cond half's.
    x, t = jnp.ones((3, D)), jnp.full((3,), 500)
    out = gd.head_model_fn(head, HEAD, zz, 3.0, guided=True)(x, t)
    full = real_apply(head, HEAD, jnp.concatenate([x, x]), jnp.concatenate([t, t]), zz)
    np.testing.assert_allclose(out[:, :D], full[3:, :D] + 3.0 * (full[:3, :D] - full[3:, :D]), atol=1e-5)
    np.testing.assert_allclose(out[:, D:], full[:3, D:], atol=1e-6)


def test_clip_log_variance_keeps_the_learned_range():
    """Variance values past [-1, 1] extrapolate the log-variance beyond log beta_t (MAR);
    ``clip_log_variance`` holds it at the range's ends, through the sampler too."""
    s = gd.make_schedule(1000, "10")
    t = jnp.array([0, 1, 5, 9])
    x = jnp.zeros((4, D))
    for v, end in ((20.0, s.log_betas), (-5.0, s.posterior_log_variance_clipped)):
        out = jnp.concatenate([jnp.zeros((4, D)), jnp.full((4, D), v)], -1)
        free = gd.p_mean_variance(s, out, x, t)["log_variance"]
        kept = gd.p_mean_variance(s, out, x, t, clip_var=True)["log_variance"]
        np.testing.assert_allclose(kept, np.broadcast_to(end[np.asarray(t)][:, None], (4, D)), rtol=1e-5)
        assert np.all(np.abs(np.asarray(free[1]) - np.asarray(kept[1])) > 5.0)   # step 1's range is wide
    wild = lambda x, tt: jnp.concatenate([jnp.zeros_like(x), jnp.full_like(x, 20.0)], -1)  # noqa: E731
    x_T = jax.random.normal(jax.random.key(0), (4, D))
    _, _, free = gd.sample_loop(wild, s, x_T, jax.random.key(1), prediction="x0")
    _, _, kept = gd.sample_loop(wild, s, x_T, jax.random.key(1), prediction="x0", clip_var=True)
    np.testing.assert_allclose(kept["log_var"], np.broadcast_to(s.log_betas[::-1, None, None], (10, 4, D)), rtol=1e-5)
    assert float(jnp.max(free["log_var"][-2])) > float(s.log_betas[1]) + 10   # the step noise MAR would draw
    # The config flag reaches the sampler.
    cfg = get_config("tiny").model.diffusion
    assert cfg.clip_log_variance and cfg.prediction == "x0" and not get_config("1.5b").model.diffusion.clip_log_variance


def test_temperature_scales_step_noise_only(head):
    z = jnp.asarray(np.random.RandomState(8).randn(2, C), jnp.float32)
    _, _, t0 = gd.sample(head, HEAD, DIFF, z, jax.random.key(6), temperature=0.0, return_trajectory=True)
    _, _, t1 = gd.sample(head, HEAD, DIFF, z, jax.random.key(6), temperature=1.0, return_trajectory=True)
    np.testing.assert_array_equal(t0["x"][0], t1["x"][0])                       # same initial noise
    # No step noise at tau 0: x_next equals the mean to float rounding (XLA may compute the
    # mean in two fusions, rounded differently); at tau 1 a step draws noise of median 0.27 here.
    np.testing.assert_allclose(t0["x_next"], t0["mean"], rtol=1e-6, atol=0)
    assert np.abs(t1["x_next"] - t1["mean"]).max() > 1e-3                       # and some at tau 1
    lp = gd.step_log_prob(jnp.zeros((2, D)), jnp.zeros((2, D)), jnp.ones((2, D)), 1.0)
    np.testing.assert_allclose(lp, -0.5 * D * (1 + math.log(2 * math.pi)), rtol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_prediction_targets_invert(prediction):
    """A network that outputs its training target exactly recovers x0 through the sampler's
    maths, for every prediction type; an unknown type is one clear error."""
    s = gd.make_schedule()
    x0 = jax.random.normal(jax.random.key(0), (6, 4))
    noise = jax.random.normal(jax.random.key(1), (6, 4))
    t = jnp.array([0, 10, 200, 500, 900, 999])
    x_t = gd.q_sample(s, x0, t, noise)
    target = gd.training_target(s, x0, t, noise, prediction)
    np.testing.assert_allclose(gd.predicted_x0(s, target, x_t, t, prediction), x0, atol=2e-3)
    # The training loss regresses that same target: the exact output scores below a shifted one.
    out = lambda x, tt: jnp.concatenate([target, jnp.zeros_like(target)], -1)
    off = lambda x, tt: jnp.concatenate([target + 0.5, jnp.zeros_like(target)], -1)
    exact, shifted = (gd.training_loss(f, x0, t, noise, s, prediction) for f in (out, off))
    assert np.all(shifted - exact > 0.2)
    with pytest.raises(ValueError, match="model.diffusion.prediction='eps'"):
        gd.check_prediction("eps")
