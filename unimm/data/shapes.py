"""The built-in shapes world: a procedural image-text dataset that can be scored exactly.

An image is a 3x3 grid of cells on a black background; each of 1-4 objects occupies its own
cell (so objects never overlap and the detector can work cell by cell). Everything is a pure
function of (seed, index), which makes the dataset random-access, infinite and reproducible.

Pure numpy; imports nothing from unimm.models or unimm.train.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
# Pairwise RGB distance >= 127, so nearest-colour assignment survives mild pixel noise.
PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
COLORS = tuple(PALETTE)
BACKGROUND = (0, 0, 0)
SIZES = ("small", "large")
# Half-extent of an object as a fraction of the cell side; the margin keeps it inside its cell.
_HALF_EXTENT = {"small": 0.24, "large": 0.42}
# Cell i is at row i // 3, column i % 3.
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GENEVAL_CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")

# A pixel farther than this from every palette colour (and the background) counts as background.
_MAX_COLOR_DIST = 100.0
# A cell needs at least this fraction of the smallest object's area to hold an object at all.
_MIN_AREA_FRAC = 0.3


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major over the 3x3 grid


Scene = tuple  # tuple[Obj, ...], sorted by cell (one object per cell) so equality is structural


def canonical(objs) -> Scene:
    return tuple(sorted(objs, key=lambda o: o.cell))


def sample_scene(seed: int, index: int, max_objects: int = 4) -> Scene:
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    return canonical(
        Obj(SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))],
            SIZES[rng.integers(len(SIZES))], int(c))
        for c in cells)


# ----------------------------------------------------------------------------- rendering

def _cell_bounds(height: int, width: int, cell: int):
    r, c = divmod(cell, 3)
    return (round(r * height / 3), round((r + 1) * height / 3),
            round(c * width / 3), round((c + 1) * width / 3))


@functools.lru_cache(maxsize=16)
def _templates(height: int, width: int):
    """Boolean masks, cropped to their cell, for every (cell, shape, size); shared by
    render and detect so that detection of a clean render is exact by construction."""
    out = {}
    for cell in range(9):
        y0, y1, x0, x1 = _cell_bounds(height, width, cell)
        r, c = divmod(cell, 3)
        cy, cx = (r + 0.5) * height / 3, (c + 0.5) * width / 3
        # Pixel centres relative to the object centre.
        dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]
        dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]
        side = min(height, width) / 3
        for size in SIZES:
            h = _HALF_EXTENT[size] * side
            masks = {
                "circle": dx ** 2 + dy ** 2 <= h ** 2,
                "square": (np.abs(dx) <= h) & (np.abs(dy) <= h),
                # Apex up, base at the bottom: the half-width grows linearly from 0 to h.
                "triangle": (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / 2),
                "diamond": np.abs(dx) + np.abs(dy) <= h,
            }
            for shape in SHAPES:
                m = np.broadcast_to(masks[shape], (y1 - y0, x1 - x0)).copy()
                m.setflags(write=False)
                out[cell, shape, size] = m
    return out


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """uint8 [S, S, 3]; hard-edged (no antialiasing) so every pixel has a palette colour.
    Any size >= 16 renders; detection is exact from 24 px up (below, small shapes are too
    few pixels to tell apart)."""
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    img = np.zeros((image_size, image_size, 3), np.uint8)
    img[:] = BACKGROUND
    tmpl = _templates(image_size, image_size)
    for o in scene:
        y0, y1, x0, x1 = _cell_bounds(image_size, image_size, o.cell)
        img[y0:y1, x0:x1][tmpl[o.cell, o.shape, o.size]] = PALETTE[o.color]
    return img


# ----------------------------------------------------------------------------- detection

_PAL = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], np.float32)  # index 0 = background


def _bbox_center(mask):
    ys, xs = np.nonzero(mask)
    return (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2


@functools.lru_cache(maxsize=16)
def _template_info(height: int, width: int):
    tmpl = _templates(height, width)
    info = {}
    for cell in range(9):
        info[cell] = [((shape, size), m, _bbox_center(m), int(m.sum()))
                      for shape in SHAPES for size in SIZES for m in [tmpl[cell, shape, size]]]
    min_area = min(int(m.sum()) for m in tmpl.values())
    return info, max(1, int(_MIN_AREA_FRAC * min_area))


def _labels(image: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (0 = background), by nearest colour with a distance cut-off."""
    x = image.reshape(-1, 3).astype(np.float32)
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2 as one small matmul: ~10x faster than broadcasting.
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ _PAL.T + (_PAL * _PAL).sum(1)
    lab = d2.argmin(1)
    lab[d2[np.arange(len(x)), lab] > _MAX_COLOR_DIST ** 2] = 0
    return lab.reshape(image.shape[:2])


MIN_IOU = 0.5       # detected blob vs best shape template
MAX_CLUTTER = 0.5   # other-colour pixels in a cell, relative to the object's pixels


def detect(image: np.ndarray) -> Scene:
    """Parse an RGB image back into its objects: per cell, the dominant palette colour gives
    the object's colour and mask; the best-matching template (by IoU after aligning bounding
    box centres, which forgives small shifts in generated images) gives shape and size."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3] image, got {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    info, min_pixels = _template_info(h, w)
    lab = _labels(image)
    objs = []
    for cell in range(9):
        y0, y1, x0, x1 = _cell_bounds(h, w, cell)
        crop = lab[y0:y1, x0:x1]
        counts = np.bincount(crop.ravel(), minlength=len(_PAL))
        counts[0] = 0
        k = int(counts.argmax())
        if counts[k] < min_pixels:
            continue
        mask = crop == k
        my, mx = _bbox_center(mask)
        n_mask = counts[k]
        best, best_iou = None, -1.0
        for key, t, (ty, tx), n_t in info[cell]:
            shifted = np.roll(mask, (round(ty - my), round(tx - mx)), axis=(0, 1))
            inter = int(np.count_nonzero(shifted & t))
            iou = inter / (n_mask + n_t - inter)
            if iou > best_iou:
                best, best_iou = key, iou
        # A cell of scattered colours (noise, a smeared generation) holds no object: the
        # dominant colour must form a template-like blob and outweigh the other colours.
        if best_iou < MIN_IOU or counts.sum() - n_mask > MAX_CLUTTER * n_mask:
            continue
        objs.append(Obj(best[0], COLORS[k - 1], best[1], cell))
    return canonical(objs)


# ----------------------------------------------------------------------------- text

def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _count_phrase(n: int, noun: str) -> str:
    return _a(noun) if n == 1 else f"{NUMBER_WORDS[n]} {_plural(noun, n)}"


def _join(parts) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def short_caption(scene: Scene) -> str:
    """'two red circles and a blue square': equal (colour, shape) grouped, in cell order."""
    groups: dict = {}
    for o in scene:
        groups[o.color, o.shape] = groups.get((o.color, o.shape), 0) + 1
    if not groups:
        return "nothing"
    return _join(_count_phrase(n, f"{c} {s}") for (c, s), n in groups.items())


def long_caption(scene: Scene, order=None) -> str:
    """Every object: 'a large red circle at the top left, a small blue square at the center.'
    In cell order, or in ``order`` (a permutation of the scene's objects)."""
    if not scene:
        return "an empty image."
    objs = scene if order is None else [scene[i] for i in order]
    return ", ".join(f"a {o.size} {o.color} {o.shape} at the {POSITIONS[o.cell]}"
                     for o in objs) + "."


def prompt_order(scene: Scene, spec: dict) -> list[int]:
    """The scene's objects in the order its GenEval prompt names them (objects of one shape in
    cell order): the description that copies each named colour beside its shape."""
    rank = {w["shape"]: k for k, w in enumerate(spec["objects"])}
    return sorted(range(len(scene)), key=lambda i: rank.get(scene[i].shape, len(rank)))


_LONG_RE = re.compile(r"a (\w+) (\w+) (\w+) at the ([a-z ]+)")


def parse_long_caption(text: str) -> Scene:
    """Exact inverse of long_caption; raises ValueError on anything else."""
    text = text.strip()
    if text == "an empty image.":
        return ()
    if not text.endswith("."):
        raise ValueError(f"not a long caption: {text!r}")
    objs = []
    for part in text[:-1].split(", "):
        m = _LONG_RE.fullmatch(part)
        if not m or m[1] not in SIZES or m[2] not in PALETTE or m[3] not in SHAPES \
                or m[4] not in POSITIONS:
            raise ValueError(f"cannot parse {part!r}")
        objs.append(Obj(m[3], m[2], m[1], POSITIONS.index(m[4])))
    return canonical(objs)


def question_answers(scene: Scene, rng: np.random.Generator) -> list:
    """A handful of (question, answer) pairs whose answers follow exactly from the scene."""
    qa = [("how many objects are there?", NUMBER_WORDS[len(scene)])]
    shape = SHAPES[rng.integers(len(SHAPES))]
    n = sum(o.shape == shape for o in scene)
    qa.append((f"how many {shape}s are there?", NUMBER_WORDS[n]))
    # Colour and position questions only about objects the question identifies uniquely.
    unique_shape = [o for o in scene if sum(p.shape == o.shape for p in scene) == 1]
    if unique_shape:
        o = unique_shape[rng.integers(len(unique_shape))]
        qa.append((f"what color is the {o.shape}?", o.color))
    unique_cs = [o for o in scene
                 if sum((p.shape, p.color) == (o.shape, o.color) for p in scene) == 1]
    if unique_cs:
        o = unique_cs[rng.integers(len(unique_cs))]
        qa.append((f"where is the {o.color} {o.shape}?", POSITIONS[o.cell]))
        qa.append((f"what size is the {o.color} {o.shape}?", o.size))
    # Existence: half the time about a present object, otherwise a random (colour, shape).
    present = {(o.color, o.shape) for o in scene}
    if scene and rng.random() < 0.5:
        o = scene[rng.integers(len(scene))]
        c, s = o.color, o.shape
    else:
        c, s = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    qa.append((f"is there a {c} {s}?", "yes" if (c, s) in present else "no"))
    return qa


# ----------------------------------------------------------------------------- GenEval-style prompts

def geneval_prompt(seed: int, index: int):
    """(category, prompt, spec); categories cycle with the index so every split is balanced.
    spec is JSON-friendly: {"category", "objects": [{"shape", "color"}], "count", "relation"}."""
    rng = np.random.default_rng([seed, index, 1])  # the extra key keeps it apart from scenes
    cat = GENEVAL_CATEGORIES[index % len(GENEVAL_CATEGORIES)]
    s1, s2 = (str(s) for s in rng.choice(SHAPES, 2, replace=False))
    c1, c2 = (str(c) for c in rng.choice(COLORS, 2, replace=False))
    spec = {"category": cat, "objects": [], "count": None, "relation": None}
    if cat == "single_object":
        spec["objects"] = [{"shape": s1, "color": None}]
        prompt = f"a photo of {_a(s1)}"
    elif cat == "two_objects":
        spec["objects"] = [{"shape": s1, "color": None}, {"shape": s2, "color": None}]
        prompt = f"a photo of {_a(s1)} and {_a(s2)}"
    elif cat == "counting":
        n = int(rng.integers(2, 5))
        spec["objects"], spec["count"] = [{"shape": s1, "color": None}], n
        prompt = f"a photo of {NUMBER_WORDS[n]} {s1}s"
    elif cat == "colors":
        spec["objects"] = [{"shape": s1, "color": c1}]
        prompt = f"a photo of {_a(c1)} {s1}"
    elif cat == "position":
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        spec["objects"] = [{"shape": s1, "color": None}, {"shape": s2, "color": None}]
        spec["relation"] = rel
        prompt = f"a photo of {_a(s1)} {rel} {_a(s2)}"
    else:  # color_attr
        spec["objects"] = [{"shape": s1, "color": c1}, {"shape": s2, "color": c2}]
        prompt = f"a photo of {_a(c1)} {s1} and {_a(c2)} {s2}"
    return cat, prompt, spec


def _matches(o: Obj, want: dict) -> bool:
    return o.shape == want["shape"] and (want["color"] is None or o.color == want["color"])


def _related(a: Obj, b: Obj, rel: str) -> bool:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def check_geneval(spec: dict, scene: Scene) -> bool:
    """Does the (detected) scene satisfy the prompt? Mirrors GenEval's per-category rules."""
    objs = spec["objects"]
    if spec["category"] == "counting":
        return sum(_matches(o, objs[0]) for o in scene) == spec["count"]
    if spec["category"] == "position":
        return any(_related(a, b, spec["relation"]) for a in scene if _matches(a, objs[0])
                   for b in scene if b is not a and _matches(b, objs[1]))
    if spec["category"] == "colors":
        # GenEval: an object of the named shape is present with the named colour.
        return any(_matches(o, objs[0]) for o in scene)
    # single_object, two_objects, color_attr: every requested object is present, on distinct
    # objects (the requested shapes always differ, so one object cannot serve twice).
    return all(any(_matches(o, want) for o in scene) for want in objs)


def geneval_diagnosis(spec: dict, scene: Scene) -> dict[str, bool]:
    """Why a (detected) scene fails its prompt, in two parts: ``object_count`` (as many
    objects as the prompt asks for: its count for counting, else one per named object) and
    ``named_shapes`` (every shape the prompt names is drawn, whatever its colour or place).
    A scene can pass both and still fail on colours or the relation."""
    objs = spec["objects"]
    want = spec["count"] if spec["category"] == "counting" else len(objs)
    return {"object_count": len(scene) == want,
            "named_shapes": all(any(o.shape == w["shape"] for o in scene) for w in objs)}


def scene_for_spec(spec: dict, seed: int = 0) -> Scene:
    """A scene that satisfies spec (and nothing more): the reference 'perfect generation'."""
    rng = np.random.default_rng([seed, 2])
    objs = spec["objects"]
    pick = lambda want: (want["color"] or COLORS[rng.integers(len(COLORS))])
    size = lambda: SIZES[rng.integers(len(SIZES))]
    if spec["category"] == "counting":
        cells = rng.choice(9, spec["count"], replace=False)
        return canonical(Obj(objs[0]["shape"], pick(objs[0]), size(), int(c)) for c in cells)
    if spec["category"] == "position":
        while True:
            a, b = (int(c) for c in rng.choice(9, 2, replace=False))
            if _related(Obj("", "", "", a), Obj("", "", "", b), spec["relation"]):
                break
        return canonical([Obj(objs[0]["shape"], pick(objs[0]), size(), a),
                          Obj(objs[1]["shape"], pick(objs[1]), size(), b)])
    cells = rng.choice(9, len(objs), replace=False)
    return canonical(Obj(w["shape"], pick(w), size(), int(c)) for w, c in zip(objs, cells))


def scene_to_dict(scene: Scene) -> list:
    return [{"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell} for o in scene]


def scene_from_dict(items) -> Scene:
    return canonical(Obj(d["shape"], d["color"], d["size"], int(d["cell"])) for d in items)
