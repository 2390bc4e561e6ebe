"""The built-in shapes world: determinism, exact detection, caption round trips, GenEval checks."""
import dataclasses

import numpy as np
import pytest

from unimm.data import shapes as S


def test_determinism_and_variety():
    for i in range(50):
        a, b = S.sample_scene(3, i), S.sample_scene(3, i)
        assert a == b
        assert np.array_equal(S.render(a), S.render(b))
    scenes = {S.sample_scene(3, i) for i in range(200)}
    assert len(scenes) > 190  # different indices give different scenes (almost always)
    assert S.sample_scene(3, 0) != S.sample_scene(4, 0)


def test_scene_structure():
    counts = set()
    for i in range(1000):
        sc = S.sample_scene(0, i)
        cells = [o.cell for o in sc]
        assert len(set(cells)) == len(cells)  # one object per cell: no overlap
        assert cells == sorted(cells)  # canonical order
        assert 1 <= len(sc) <= 4
        counts.add(len(sc))
        for o in sc:
            assert o.shape in S.SHAPES and o.color in S.COLORS and o.size in S.SIZES
    assert counts == {1, 2, 3, 4}


def test_render_pixels_inside_cells():
    # Every object's pixels stay inside its own cell, so objects cannot touch.
    for i in range(100):
        sc = S.sample_scene(1, i)
        img = S.render(sc, 64)
        lit = img.any(-1)
        for o in sc:
            y0, y1, x0, x1 = S._cell_bounds(64, 64, o.cell)
            lit[y0:y1, x0:x1] = False
        assert not lit.any()


def test_detector_exact_10k_at_64():
    wrong = sum(S.detect(S.render(sc := S.sample_scene(0, i), 64)) != sc for i in range(10_000))
    assert wrong == 0


@pytest.mark.parametrize("size", [24, 32, 48, 100, 128])
def test_detector_exact_other_sizes(size):
    for i in range(300):
        sc = S.sample_scene(7, i)
        assert S.detect(S.render(sc, size)) == sc, (size, i)


def test_render_small_sizes():
    assert S.render(S.sample_scene(0, 0), 16).shape == (16, 16, 3)
    with pytest.raises(ValueError):
        S.render(S.sample_scene(0, 0), 15)


def test_detector_blank_and_noise():
    assert S.detect(np.zeros((64, 64, 3), np.uint8)) == ()
    rng = np.random.default_rng(0)
    noisy_blank = np.clip(rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert S.detect(noisy_blank) == ()
    for i in range(200):
        sc = S.sample_scene(2, i)
        img = S.render(sc, 64).astype(np.float32) + rng.normal(0, 8, (64, 64, 3))
        assert S.detect(np.clip(np.round(img), 0, 255).astype(np.uint8)) == sc, i


def test_detector_tolerates_one_pixel_shift():
    # Generated images are rarely pixel-aligned; a 1 px shift must not change the answer.
    for i in range(100):
        sc = S.sample_scene(5, i)
        img = np.roll(S.render(sc, 64), (1, -1), axis=(0, 1))
        assert S.detect(img) == sc, i


def test_long_caption_round_trip():
    for i in range(1000):
        sc = S.sample_scene(0, i)
        assert S.parse_long_caption(S.long_caption(sc)) == sc
    assert S.parse_long_caption(S.long_caption(())) == ()
    with pytest.raises(ValueError):
        S.parse_long_caption("a huge red circle at the top.")


def test_captions_examples():
    obj = S.Obj
    sc = S.canonical([obj("circle", "red", "large", 0), obj("square", "blue", "small", 4),
                      obj("circle", "red", "small", 8)])
    assert S.short_caption(sc) == "two red circles and a blue square"
    assert S.long_caption(sc) == ("a large red circle at the top left, a small blue square "
                                  "at the center, a small red circle at the bottom right.")
    sc2 = S.canonical([obj("triangle", "orange", "large", 1), obj("diamond", "green", "large", 3),
                       obj("diamond", "green", "small", 5), obj("diamond", "green", "small", 6)])
    assert S.short_caption(sc2) == "an orange triangle and three green diamonds"
    sc3 = sc2 + (obj("circle", "white", "small", 7),)
    assert S.short_caption(sc3) == "an orange triangle, three green diamonds and a white circle"


def test_question_answers_consistent():
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(300):
        sc = S.sample_scene(0, i)
        for q, a in S.question_answers(sc, rng):
            seen.add(q.split()[0] + " " + q.split()[1])
            if q == "how many objects are there?":
                assert a == S.NUMBER_WORDS[len(sc)]
            elif q.startswith("how many "):
                shape = q.split()[2][:-1]
                assert a == S.NUMBER_WORDS[sum(o.shape == shape for o in sc)]
            elif q.startswith("what color is the "):
                shape = q[len("what color is the "):-1]
                assert [o.color for o in sc if o.shape == shape] == [a]
            elif q.startswith("is there "):
                c, s = q[:-1].split()[-2:]
                assert a == ("yes" if any((o.color, o.shape) == (c, s) for o in sc) else "no")
    assert {"how many", "what color", "is there", "where is", "what size"} <= seen


def _mismatch(spec, scene):
    """A scene that violates spec, made by a category-specific minimal edit."""
    objs = list(scene)
    cat = spec["category"]
    if cat == "single_object":
        other = next(s for s in S.SHAPES if s != objs[0].shape)
        return S.canonical([dataclasses.replace(objs[0], shape=other)])
    if cat in ("two_objects", "counting"):
        return S.canonical(objs[:-1])
    if cat == "colors":
        other = next(c for c in S.COLORS if c != objs[0].color)
        return S.canonical([dataclasses.replace(objs[0], color=other)])
    if cat == "position":
        a, b = objs
        return S.canonical([dataclasses.replace(a, cell=b.cell), dataclasses.replace(b, cell=a.cell)])
    a, b = objs  # color_attr: swap the colours
    return S.canonical([dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)])


def test_geneval_prompts_and_checks():
    seen = {}
    for i in range(120):
        cat, prompt, spec = S.geneval_prompt(0, i)
        assert (cat, prompt, spec) == S.geneval_prompt(0, i)
        assert cat == spec["category"] and prompt.startswith("a photo of ")
        seen.setdefault(cat, prompt)
        good = S.scene_for_spec(spec, seed=i)
        assert S.check_geneval(spec, S.detect(S.render(good))), (prompt, good)
        bad = _mismatch(spec, good)
        assert not S.check_geneval(spec, S.detect(S.render(bad))), (prompt, bad)
    assert set(seen) == set(S.GENEVAL_CATEGORIES)
    assert " a orange" not in " ".join(S.geneval_prompt(0, i)[1] for i in range(300))


def test_geneval_diagnosis_separates_count_from_shapes():
    """The perfect scene passes both parts; an extra object breaks the count only; the
    second named shape redrawn as the first breaks the shapes only."""
    specs = {}
    for i in range(60):
        cat, _, spec = S.geneval_prompt(0, i)
        specs.setdefault(cat, spec)
    for cat in ("two_objects", "position", "counting"):
        spec = specs[cat]
        good = S.scene_for_spec(spec, seed=1)
        assert S.geneval_diagnosis(spec, good) == {"object_count": True, "named_shapes": True}
        free = next(c for c in range(9) if c not in {o.cell for o in good})
        extra = S.canonical([*good, dataclasses.replace(good[0], cell=free)])
        assert S.geneval_diagnosis(spec, extra) == {"object_count": False, "named_shapes": True}
        if cat != "counting":   # counting names one shape
            first = spec["objects"][0]["shape"]
            twice = S.canonical([dataclasses.replace(o, shape=first) for o in good])
            assert S.geneval_diagnosis(spec, twice) == {"object_count": True, "named_shapes": False}
            assert not S.check_geneval(spec, twice)


def test_scene_dict_round_trip():
    for i in range(100):
        sc = S.sample_scene(0, i)
        assert S.scene_from_dict(S.scene_to_dict(sc)) == sc


def test_detector_finds_nothing_in_random_noise():
    """Random pixels must not pass as objects (else noise would satisfy GenEval prompts)."""
    rng = np.random.default_rng(0)
    for size in (32, 64):
        for _ in range(50):
            noise = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
            assert S.detect(noise) == ()


def test_labeled_grid_shows_each_image_its_prompt_and_check():
    from unimm.eval.shapes_bench import labeled_grid
    images = [S.render(S.sample_scene(0, i), 24) for i in range(3)]
    grid = labeled_grid(images, ["a photo of a red circle", "two squares", "input"], [True, False, None],
                        cols=2, cell=48)
    pad, text_h = 3, 4 * 12 + 2
    tile_w, tile_h = 48 + 2 * pad, 48 + 2 * pad + text_h
    assert grid.shape == (2 * tile_h, 2 * tile_w, 3) and grid.dtype == np.uint8
    assert tuple(grid[0, 0]) == (0, 160, 0) and tuple(grid[0, tile_w]) == (200, 0, 0)   # pass / fail frames
    assert tuple(grid[tile_h, 0]) == (255, 255, 255)                                     # no check: no frame
    np.testing.assert_array_equal(grid[pad:pad + 48:2, pad:pad + 48:2], images[0])       # nearest upscale x2
    label = grid[48 + 2 * pad:tile_h, :tile_w]
    assert (label < 128).any() and (label == 255).any()                                  # the prompt's text
