"""sample.plan: the generator's LLM writes each prompt's description, and the image is drawn
from that description (the planning task trains it: tests/test_data.py, test_train_step.py)."""
import jax
import numpy as np

from unimm import config_utils, resolve
from unimm.data import text
from unimm.inference.model import Model
from unimm.models import harmon
from unimm.train.state import initial_tokenizer_params

from tiny import one_block_each   # tests/tiny.py


def test_generate_draws_from_the_models_own_descriptions():
    tok = text.shapes_tokenizer()
    config = resolve.thaw(resolve.resolve(one_block_each(config_utils.load_config("configs/harmon.py:tiny")), tok))
    config.sample.update(num_sampling_steps="3", num_iter=3, max_new_tokens=12, plan=False, plan_temperature=1.0)
    # Perturbed params: a fresh head's zero-initialised output would draw the same image anyway.
    params = harmon.init(config.model, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    model = Model(config, tok, params, initial_tokenizer_params(config, jax.random.key(0)))
    prompts = ["a photo of a square", "a photo of two circles"]

    sampled = [model.plan(prompts, jax.random.key(k)) for k in range(3)]
    assert all(len(p) == 2 and all(isinstance(s, str) for s in p) for p in sampled)
    assert len({tuple(p) for p in sampled}) > 1                 # plan_temperature 1: the key matters
    config.sample.plan_temperature = 0.0
    assert model.plan(prompts, jax.random.key(0)) == model.plan(prompts, jax.random.key(5))   # greedy

    config.sample.plan = True
    rng = jax.random.key(7)
    planned = model.generate(prompts, rng)
    k_plan, k_draw = jax.random.split(rng)
    descriptions = model.plan(prompts, k_plan)
    images, drawn_from = model.generate_with_plans(prompts, rng)
    np.testing.assert_array_equal(images, planned)
    assert drawn_from == descriptions
    config.sample.plan = False
    np.testing.assert_array_equal(planned, model.generate(descriptions, k_draw))
    assert not np.array_equal(planned, model.generate(prompts, k_draw))
