"""unimm.eval.head_probe: the probe's data and its reading of tokens are exact."""
import jax
import numpy as np

from unimm import config_utils
from unimm.eval import head_probe


def test_every_exact_token_reads_back_as_its_object():
    table = head_probe.cell_tokens(8)
    assert table.shape == (1 + 2 * len(head_probe.OBJECTS), 192)
    assert head_probe.classify(table[0], [head_probe.OBJECTS[0]], table[0], 8) == "empty"
    for i, (color, shape) in enumerate(head_probe.OBJECTS):
        for size in range(2):
            assert head_probe.classify(table[1 + 2 * i + size], [(color, shape)], table[0], 8) == "right"
    # The same token under another condition is the wrong shape, colour or both.
    red_square = table[1 + 2 * head_probe.OBJECTS.index(("red", "square"))]
    assert head_probe.classify(red_square, [("red", "circle")], table[0], 8) == "wrong_shape"
    assert head_probe.classify(red_square, [("blue", "square")], table[0], 8) == "wrong_color"
    assert head_probe.classify(red_square, [("blue", "circle")], table[0], 8) == "wrong_both"
    # A faint smear is neither an object nor an empty cell.
    assert head_probe.classify(table[0] + 0.6 * (red_square - table[0]), [("red", "square")], table[0], 8) == "junk"


def test_conditions_hold_their_object_at_the_asked_rate():
    conds = head_probe.conditions(1)
    cond, rows = (np.asarray(a) for a in head_probe.draw(jax.random.key(0), 60000, 0.25, conds))
    conditioned = cond < len(conds)
    present = rows > 0
    assert abs(present[conditioned].mean() - 0.25) < 0.01
    assert abs(present[~conditioned].mean() - 0.5) < 0.02
    # A conditioned row holds its own object, in either size.
    obj = (rows - 1) // 2
    assert (obj[conditioned & present] == cond[conditioned & present]).all()
    assert set(np.unique((rows[present] - 1) % 2)) == {0, 1}


def test_two_object_conditions_hold_either_object():
    conds = head_probe.conditions(2)
    assert len(conds) == 8 * 7 * 4 * 3     # different colours and different shapes, ordered
    pairs = [[head_probe.OBJECTS[i] for i in c] for c in conds]
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in pairs)
    cond, rows = (np.asarray(a) for a in head_probe.draw(jax.random.key(1), 60000, 0.1, conds))
    conditioned = cond < len(conds)
    present = rows > 0
    assert abs(present[conditioned].mean() - 0.2) < 0.01     # either of two, 0.1 each
    obj, c = (rows - 1) // 2, cond
    held = conditioned & present
    first, second = obj[held] == conds[c[held], 0], obj[held] == conds[c[held], 1]
    assert (first | second).all() and abs(first.mean() - 0.5) < 0.03
    # A token of one object under the pair's other colour and shape is a swap, not a blend.
    table = head_probe.cell_tokens(8)
    red_square = table[1 + 2 * head_probe.OBJECTS.index(("red", "square"))]
    want = [("red", "circle"), ("blue", "square")]
    assert head_probe.classify(red_square, want, table[0], 8) == "swapped"
    assert head_probe.classify(red_square, [("red", "square"), ("blue", "circle")], table[0], 8) == "right"
    assert head_probe.classify(red_square, [("green", "circle"), ("blue", "square")], table[0], 8) == "wrong_color"


def test_cell_code_of_24_channels_holds_every_cell_token():
    """--code_dim: the cell tokens are colour x one of 8 masks on black, so 24 principal
    components (3 channels x 8 masks) rebuild each of them; fewer lose some."""
    table = head_probe.cell_tokens(8)
    vae_cfg = config_utils.load_config("configs/harmon.py:tiny").model.vae
    for dim, exact in ((24, True), (16, False)):
        codes, decode = head_probe.cell_code(table, vae_cfg, dim)
        assert codes.shape == (len(table), dim)
        assert (np.abs(decode(codes) - table).max() < 1e-4) == exact
