"""unimm.eval.loop_probe: its one-step draw masks exactly the asked cells and keeps the rest."""
import jax
import jax.numpy as jnp
import numpy as np

from unimm import config_utils, resolve
from unimm.data import text
from unimm.eval import loop_probe
from unimm.inference.model import Model
from unimm.models import harmon
from unimm.train.state import initial_tokenizer_params

from tiny import one_block_each   # tests/tiny.py


def test_one_step_draw_fills_only_the_masked_cells():
    tok = text.shapes_tokenizer()
    config = resolve.resolve(one_block_each(config_utils.load_config("configs/harmon.py:tiny")), tok)
    config = resolve.thaw(config)
    config.sample.num_sampling_steps = "3"
    # Perturbed params: a fresh head's zero-initialised output would draw the background anyway.
    params = harmon.init(config.model, jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    model = Model(config, tok, params, initial_tokenizer_params(config, jax.random.key(0)))
    rows = ["a photo of a square"] * 3
    tokens, mask = text.t2i_rows(tok, rows, text.sampling_prompt_len(tok, rows, config), guided=True)
    seq, dim = config.model.mar.grid ** 2, config.model.mar.token_dim
    background = jnp.full((dim,), -1.0)
    img, masked = (np.asarray(a) for a in loop_probe.one_step_draw(model, tokens, mask, background, 2,
                                                                  jax.random.key(0), 2.0))
    assert img.shape == (3, seq, dim) and masked.shape == (3, seq)
    assert (masked.sum(1) == 2).all() and (masked == masked[:1]).all()     # the same 2 cells in every row
    np.testing.assert_array_equal(img[~masked], -1.0)
    assert np.isfinite(img).all() and (img[masked] != -1.0).any()
