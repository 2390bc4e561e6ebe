"""GRPO arithmetic against hand-computed values."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unimm.train import grpo_math as gm

REWARDS = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])


def test_advantage_estimators():
    # Group 0: mean 0.5, population std 0.5; group 1: constant; group 2: mean 0.75, std sqrt(27)/4.
    s = 0.5 / (0.5 + gm.STD_EPS)
    std2 = math.sqrt(27) / 4
    np.testing.assert_allclose(gm.advantages("grpo", REWARDS), [
        [s, -s, -s, s], [0, 0, 0, 0],
        [2.25 / (std2 + gm.STD_EPS)] + [-0.75 / (std2 + gm.STD_EPS)] * 3], rtol=1e-6)
    np.testing.assert_allclose(gm.advantages("drgrpo", REWARDS),
                               [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [2.25, -0.75, -0.75, -0.75]], rtol=1e-6)
    # Leave-one-out: 1 - (0+0+1)/3 = 2/3; 0 - 2/3; 3 - 0 = 3; 0 - 1 = -1.
    np.testing.assert_allclose(gm.advantages("rloo", REWARDS),
                               [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0, 0, 0, 0], [3, -1, -1, -1]], rtol=1e-6)
    with pytest.raises(ValueError, match="registered"):
        gm.advantages("ppo", REWARDS)


def test_registry_takes_new_estimators():
    @gm.register_advantage("test_sign")
    def sign(r):
        return jnp.sign(r - r.mean(axis=1, keepdims=True))
    try:
        np.testing.assert_array_equal(gm.advantages("test_sign", REWARDS)[0], [1, -1, -1, 1])
    finally:
        del gm.ADVANTAGES["test_sign"]


def test_dapo_drops_constant_groups():
    np.testing.assert_array_equal(gm.informative_groups(REWARDS), [True, False, True])


@pytest.mark.parametrize("ratio, adv, want, clipped", [
    (1.5, 1.0, 1.28, True),     # above 1 + ε_high with A > 0: capped
    (1.5, -1.0, -1.5, False),   # A < 0: the pessimistic (unclipped) term wins
    (0.5, -1.0, -0.8, True),    # below 1 - ε_low with A < 0: capped
    (0.5, 1.0, 0.5, False),
    (1.0, 2.0, 2.0, False),
])
def test_clipped_objective(ratio, adv, want, clipped):
    obj, active = gm.clipped_objective(jnp.log(jnp.array([ratio])), jnp.zeros(1), jnp.array([adv]), 0.2, 0.28)
    np.testing.assert_allclose(obj, [want], rtol=1e-6)
    assert bool(active[0]) == clipped


def test_k3_kl():
    kl = gm.k3_kl(jnp.log(jnp.array([0.5, 0.3])), jnp.log(jnp.array([0.25, 0.3])))
    np.testing.assert_allclose(kl, [0.5 - math.log(0.5) - 1.0, 0.0], atol=1e-7)


def test_gaussian_kl_matches_torch():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    lv1, lv2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(m1), torch.tensor(np.exp(0.5 * lv1))),
        torch.distributions.Normal(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2)))).sum(-1).numpy()
    got = gm.gaussian_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Equal variances: Flow-GRPO's ||mu - mu_ref||^2 / (2 sigma^2) (here 1 / 8 per dim).
    lv = jnp.full((1, 2), math.log(4.0))
    np.testing.assert_allclose(gm.gaussian_kl(jnp.ones((1, 2)), lv, jnp.zeros((1, 2)), lv), [0.25], rtol=1e-6)


def test_aggregations():
    values = jnp.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(gm.aggregate(values, mask, "token-mean"), 10 / 4)
    np.testing.assert_allclose(gm.aggregate(values, mask, "seq-mean-token-mean"), (2 + 4) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        gm.aggregate(values, mask, "sum")
