"""unimm.eval.head_probe: the probe's data and its reading of tokens are exact."""
import jax
import numpy as np

from unimm.eval import head_probe


def test_every_exact_token_reads_back_as_its_object():
    table = head_probe.cell_tokens(8)
    assert table.shape == (1 + 2 * len(head_probe.OBJECTS), 192)
    assert head_probe.classify(table[0], head_probe.OBJECTS[0], table[0], 8) == "empty"
    for i, (color, shape) in enumerate(head_probe.OBJECTS):
        for size in range(2):
            assert head_probe.classify(table[1 + 2 * i + size], (color, shape), table[0], 8) == "right"
    # The same token under another condition is the wrong shape, colour or both.
    red_square = table[1 + 2 * head_probe.OBJECTS.index(("red", "square"))]
    assert head_probe.classify(red_square, ("red", "circle"), table[0], 8) == "wrong_shape"
    assert head_probe.classify(red_square, ("blue", "square"), table[0], 8) == "wrong_color"
    assert head_probe.classify(red_square, ("blue", "circle"), table[0], 8) == "wrong_both"
    # A faint smear is neither an object nor an empty cell.
    assert head_probe.classify(table[0] + 0.6 * (red_square - table[0]), ("red", "square"), table[0], 8) == "junk"


def test_conditions_hold_their_object_at_the_asked_rate():
    cond, rows = (np.asarray(a) for a in head_probe.draw(jax.random.key(0), 60000, 0.25))
    conditioned = cond < head_probe.UNCOND
    present = rows > 0
    assert abs(present[conditioned].mean() - 0.25) < 0.01
    assert abs(present[~conditioned].mean() - 0.5) < 0.02
    # A conditioned row holds its own object, in either size.
    obj = (rows - 1) // 2
    assert (obj[conditioned & present] == cond[conditioned & present]).all()
    assert set(np.unique((rows[present] - 1) % 2)) == {0, 1}
