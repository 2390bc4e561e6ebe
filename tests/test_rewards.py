"""GRPO rewards: exact and partial scene matches, GenEval checks, feature and latent cosines."""
import jax
import numpy as np
import pytest

from unimm import config_utils
from unimm.data import shapes
from unimm.models import harmon, layers
from unimm.eval import rewards
from unimm.train.state import initial_tokenizer_params

A = shapes.Obj("circle", "red", "large", 0)
B = shapes.Obj("square", "blue", "small", 4)
C = shapes.Obj("square", "green", "small", 4)


def test_scene_match_values():
    assert rewards.scene_match((A, B), (A, B)) == 1.0
    assert rewards.scene_match((A, B), (A, C)) == 0.5
    assert rewards.scene_match((A,), (A, C)) == 0.5        # an extra object costs too
    assert rewards.scene_match((A, B), ()) == 0.0
    assert rewards.scene_match((), ()) == 1.0


def test_shapes_match_on_renders():
    src = np.stack([shapes.render((A, B), 32), shapes.render((A,), 32)])
    gen = np.stack([shapes.render((A, C), 32), shapes.render((A,), 32)])
    np.testing.assert_allclose(rewards.get_reward("shapes_match")(src, gen), [0.5, 1.0])
    with pytest.raises(ValueError, match="registered"):
        rewards.get_reward("clip")


def test_rewards_joined_by_plus_average():
    config = config_utils.load_config("configs/harmon.py:tiny")
    s = config.data.image_size
    tokenizer = initial_tokenizer_params(config, jax.random.key(0))
    context = {"tokenize": rewards.tokenizer_latents(config.model, tokenizer, s)}
    src = np.stack([shapes.render((A, B), s), shapes.render((A,), s)])
    gen = np.stack([shapes.render((A, C), s), shapes.render((A,), s)])
    match = rewards.get_reward("shapes_match")(src, gen)
    latent = rewards.get_reward("latent_similarity")(src, gen, **context)
    both = rewards.get_reward("shapes_match + latent_similarity")(src, gen, **context)
    np.testing.assert_allclose(both, (match + latent) / 2, rtol=1e-6)
    assert both.dtype == np.float32 and 0.5 < both[0] < 1.0 and both[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'shapes_match\\+clip'.*joined by"):
        rewards.get_reward("shapes_match+clip")


def test_geneval_reward_checks_the_prompt_spec():
    spec = {"category": "colors", "objects": [{"shape": "circle", "color": "red"}], "count": None, "relation": None}
    gen = np.stack([shapes.render((A,), 32), shapes.render((B,), 32), shapes.render((A, B), 32)])
    np.testing.assert_array_equal(rewards.geneval(None, gen, specs=[spec] * 3), [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="specs"):
        rewards.geneval(gen, gen)


_init = jax.jit(harmon.init, static_argnums=0)   # one compile (test_sharding's too), not op by op


@pytest.mark.parametrize("name", ["feature_cosine", "latent_similarity"])
def test_cosine_rewards(name):
    config = config_utils.load_config("configs/harmon.py:tiny")
    s = config.data.image_size
    params = _init(layers.freeze(config.model), jax.random.key(0))
    tokenizer = initial_tokenizer_params(config, jax.random.key(0))
    context = {"features": rewards.mar_features(params, config.model, tokenizer, s),
               "tokenize": rewards.tokenizer_latents(config.model, tokenizer, s)}
    src = np.stack([shapes.render((A, B), s), shapes.render((A,), s)])
    other = np.stack([shapes.render((C,), s), shapes.render((B,), s)])
    fn = rewards.get_reward(name)
    same = fn(src, src, **context)
    np.testing.assert_allclose(same, [1.0, 1.0], atol=1e-5)
    diff = fn(src, other, **context)
    assert (diff < same - 1e-3).all()


def test_unified_bench_scores_each_encoder_and_their_mean():
    from unimm.eval import shapes_bench
    from unimm.inference.model import Model
    config = config_utils.load_config("configs/harmon.py:tiny")
    s = config.data.image_size
    params = _init(layers.freeze(config.model), jax.random.key(0))
    model = Model(config, None, params, initial_tokenizer_params(config, jax.random.key(0)))
    encoders = shapes_bench.builtin_encoders(model, config.eval.unified_bench)
    encoders["pixels"] = lambda images: np.asarray(images, np.float32)
    src = np.stack([shapes.render((A, B), s), shapes.render((A,), s)])
    other = np.stack([shapes.render((C,), s), shapes.render((B,), s)])
    same = shapes_bench.unified_bench(src, src, encoders)
    assert set(same) == {"mar", "latent", "pixels", "overall"}
    np.testing.assert_allclose(list(same.values()), 1.0, atol=1e-5)
    diff = shapes_bench.unified_bench(src, other, encoders)
    assert all(diff[k] < 1.0 - 1e-3 for k in diff)
    assert diff["overall"] == pytest.approx(np.mean([diff["mar"], diff["latent"], diff["pixels"]]))
    with pytest.raises(ValueError, match="unknown encoder 'clip'"):
        shapes_bench.builtin_encoders(model, ("clip",))
