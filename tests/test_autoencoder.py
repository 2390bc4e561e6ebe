"""The auto-encoder view: one shared model, or two models joined by a connector."""
import jax
import numpy as np
import pytest

from unimm import config_utils, resolve
from unimm.autoencoder import AutoEncoder
from unimm.data import shapes
from unimm.inference.model import Model
from unimm.models import harmon, layers
from unimm.train.state import initial_tokenizer_params


@pytest.fixture(scope="module")
def models():
    config = config_utils.load_config("configs/harmon.py:tiny")
    config.sample.num_sampling_steps, config.sample.max_new_tokens = "5", 12
    tok = resolve.make_tokenizer(config)
    config = resolve.resolve(config, tok)
    init = jax.jit(harmon.init, static_argnums=0)
    cfg = layers.freeze(config.model)
    params = [init(cfg, jax.random.key(seed)) for seed in (0, 1)]
    # The head's output layer starts at zero (every init samples alike): give the second a
    # non-zero one so the two decoders draw different images.
    final = params[1]["head"]["final_layer"]["linear"]
    final["kernel"] = 0.05 * jax.random.normal(jax.random.key(2), final["kernel"].shape)
    tokenizer = initial_tokenizer_params(config, jax.random.key(3))
    return [Model(config, tok, p, tokenizer) for p in params]


def _images(n=2):
    return np.stack([shapes.render(shapes.sample_scene(0, i), 24) for i in range(n)])


def test_unified_model_round_trip(models):
    ae = AutoEncoder(models[0])
    assert ae.unified
    captions, rebuilt = ae.reconstruct(_images(), jax.random.key(0))
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert rebuilt.shape == (2, 24, 24, 3) and rebuilt.dtype == np.uint8
    assert captions == models[0].answer(_images(), [ae.question] * 2)


def test_two_models_with_a_connector(models):
    seen = []

    def connector(captions):
        seen.append(captions)
        return ["a photo of a red circle"] * len(captions)

    ae = AutoEncoder(models[0], models[1], connector=connector)
    assert not ae.unified
    captions, rebuilt = ae.reconstruct(_images(), jax.random.key(0))
    assert seen == [captions]                      # the encoder's captions reach the connector
    want = models[1].generate(["a photo of a red circle"] * 2, jax.random.key(0))
    np.testing.assert_array_equal(rebuilt, want)  # the decoder model draws from the connector's text
    other = models[0].generate(["a photo of a red circle"] * 2, jax.random.key(0))
    assert not np.array_equal(rebuilt, other)
