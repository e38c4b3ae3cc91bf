"""Deterministic procedural toy world: 32x32 RGB scenes described by a tiny fixed grammar.

Scene kinds and their prompts:

* ``single``   -- "a large red circle on the left"
* ``relation`` -- "a red circle left of a blue square" (left of, right of, above, below)
* ``mirror``   -- "a red circle above a mirror": a light-grey mirror line across row
  ``MIRROR_ROW``; the object on the named side and its darker, vertically flipped reflection
  on the other side. The prompt never mentions the reflection (an implied element).

A *spec* is a JSON-serialisable dict holding exactly what the prompt says, so
``parse_prompt(prompt_for(spec)) == spec``. Everything the prompt leaves open (exact
placement, sizes in relations) is drawn by ``render`` from its ``rng``.
"""

import copy
import functools
import itertools
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
BACKGROUND = (14, 14, 18)
MIRROR_GREY = (180, 180, 180)
MIRROR_ROW = 16
REFLECTION_SHADE = 0.65
PALETTE = {
    "red": (220, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (230, 220, 40),
    "green": (40, 190, 60),
    "cyan": (40, 200, 220),
    "blue": (50, 80, 230),
    "purple": (160, 60, 210),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
HALF_EXTENT = {"small": 4, "large": 7}
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
POSITION_OFFSET = {"left": (-7, 0), "right": (7, 0), "top": (0, -7), "bottom": (0, 7), "center": (0, 0)}
POSITION_JITTER = 2
RELATIONS = ("left of", "right of", "above", "below")
MIRROR_SIDES = ("above", "below")
KINDS = ("single", "relation", "mirror")

PAD, UNK = "<pad>", "<unk>"
VOCAB = [PAD, UNK, "a", "of", "mirror", *COLOURS, *SHAPES, *SIZES,
         *sorted({word for phrase in POSITION_PHRASE.values() for word in phrase.split()}),
         "above", "below"]
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
MAX_TOKENS = 16


@dataclass
class Scene:
    spec: dict
    prompt: str
    image: np.ndarray  # uint8 HxWx3


def tokenize(prompt):
    """Lower-cased whitespace tokens as ids, unknown words -> UNK, right-padded with PAD=0."""
    ids = [TOKEN_ID.get(word, TOKEN_ID[UNK]) for word in prompt.lower().split()][:MAX_TOKENS]
    return ids + [TOKEN_ID[PAD]] * (MAX_TOKENS - len(ids))


# ---------------------------------------------------------------- specs and prompts

def _object(colour, shape, **extra):
    return {"colour": colour, "shape": shape, **extra}


def sample_spec(rng, kind):
    """A random spec of the given kind."""
    colour = COLOURS[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    if kind == "single":
        size = SIZES[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        return {"kind": kind, "objects": [_object(colour, shape, size=size, position=position)]}
    if kind == "relation":
        other_colour = [c for c in COLOURS if c != colour][rng.integers(len(COLOURS) - 1)]
        other_shape = SHAPES[rng.integers(len(SHAPES))]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        return {"kind": kind, "objects": [_object(colour, shape), _object(other_colour, other_shape)],
                "relation": relation}
    if kind == "mirror":
        side = MIRROR_SIDES[rng.integers(len(MIRROR_SIDES))]
        return {"kind": kind, "objects": [_object(colour, shape)], "relation": side}
    raise ValueError(f"unknown scene kind {kind!r}")


def prompt_for(spec):
    """The prompt sentence for a spec."""
    objects = spec["objects"]
    if spec["kind"] == "single":
        obj = objects[0]
        return f"a {obj['size']} {obj['colour']} {obj['shape']} {POSITION_PHRASE[obj['position']]}"
    first = f"a {objects[0]['colour']} {objects[0]['shape']}"
    if spec["kind"] == "relation":
        return f"{first} {spec['relation']} a {objects[1]['colour']} {objects[1]['shape']}"
    return f"{first} {spec['relation']} a mirror"


def parse_prompt(prompt):
    """Inverse of ``prompt_for``; raises ValueError for sentences outside the grammar."""
    spec = _specs_by_prompt().get(" ".join(prompt.lower().split()))
    if spec is None:
        raise ValueError(f"prompt outside the toy grammar: {prompt!r}")
    return copy.deepcopy(spec)


@functools.cache
def _specs_by_prompt():
    return {prompt_for(spec): spec for kind in KINDS for spec in all_specs(kind)}


# ---------------------------------------------------------------- rendering

def shape_mask(shape, cx, cy, half_extent, size=IMAGE_SIZE):
    """Boolean mask of a filled shape centred on integer pixel (cx, cy); triangles point up."""
    ys, xs = np.mgrid[0:size, 0:size]
    dx, dy, r = xs - cx, ys - cy, half_extent
    if shape == "circle":
        return dx * dx + dy * dy <= r * r + r
    box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "square":
        return box
    if shape == "triangle":
        return box & (2 * np.abs(dx) <= dy + r + 1)
    raise ValueError(f"unknown shape {shape!r}")


def _blank():
    return np.broadcast_to(np.array(BACKGROUND, np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def _paint(image, mask, rgb):
    image[mask] = np.array(rgb, np.uint8)


def _place_single(obj, rng):
    r = HALF_EXTENT[obj["size"]]
    ox, oy = POSITION_OFFSET[obj["position"]]
    centre = IMAGE_SIZE // 2
    cx, cy = (int(np.clip(centre + o + rng.integers(-POSITION_JITTER, POSITION_JITTER + 1), r, IMAGE_SIZE - 1 - r))
              for o in (ox, oy))
    return cx, cy, r


def relation_holds(relation, a, b):
    """Whether centre a = (x, y) stands in ``relation`` to centre b (dominant axis, 2 px margin)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 2 and along > abs(across)


def _place_relation(spec, rng):
    """Rejection-sample two non-overlapping placements satisfying the relation with margin."""
    sizes = [("small", "small"), ("small", "large"), ("large", "small")][rng.integers(3)]
    radii = [HALF_EXTENT[s] for s in sizes]
    axis = 0 if spec["relation"] in ("left of", "right of") else 1
    while True:
        centres = [rng.integers(r, IMAGE_SIZE - r, size=2) for r in radii]
        gap = np.abs(centres[0] - centres[1]) - radii[0] - radii[1]
        along = abs(int(centres[0][axis] - centres[1][axis]))
        across = abs(int(centres[0][1 - axis] - centres[1][1 - axis]))
        if gap[axis] >= 2 and along >= 1.5 * across + 2 and relation_holds(spec["relation"], *centres):
            return [(int(c[0]), int(c[1]), r) for c, r in zip(centres, radii)]


def _mirror_rows(mask):
    """Reflect a mask across the mirror row."""
    reflected = np.zeros_like(mask)
    ys = np.arange(IMAGE_SIZE)
    target = 2 * MIRROR_ROW - ys
    inside = (target >= 0) & (target < IMAGE_SIZE)
    reflected[target[inside]] = mask[ys[inside]]
    return reflected


def render(spec, rng):
    """Render a spec to a uint8 HxWx3 image, drawing open placement choices from ``rng``."""
    image = _blank()
    objects = spec["objects"]
    if spec["kind"] == "single":
        cx, cy, r = _place_single(objects[0], rng)
        _paint(image, shape_mask(objects[0]["shape"], cx, cy, r), PALETTE[objects[0]["colour"]])
    elif spec["kind"] == "relation":
        for obj, (cx, cy, r) in zip(objects, _place_relation(spec, rng)):
            _paint(image, shape_mask(obj["shape"], cx, cy, r), PALETTE[obj["colour"]])
    else:
        obj, r = objects[0], HALF_EXTENT["small"]
        cx = int(rng.integers(r + 1, IMAGE_SIZE - 1 - r))
        cy = int(rng.integers(r + 1, MIRROR_ROW - r - 1))
        if spec["relation"] == "below":
            cy = 2 * MIRROR_ROW - cy
        mask = shape_mask(obj["shape"], cx, cy, r)
        rgb = np.array(PALETTE[obj["colour"]])
        image[MIRROR_ROW] = MIRROR_GREY
        _paint(image, mask, rgb)
        _paint(image, _mirror_rows(mask), np.round(rgb * REFLECTION_SHADE))
    return image


def sample_scene(rng, kind=None):
    """A random scene; ``kind`` None picks one of KINDS uniformly."""
    kind = kind or KINDS[rng.integers(len(KINDS))]
    spec = sample_spec(rng, kind)
    return Scene(spec=spec, prompt=prompt_for(spec), image=render(spec, rng))


# ---------------------------------------------------------------- fixed prompt sets

def all_specs(kind):
    """Every spec of a kind, in a fixed order."""
    if kind == "single":
        return [{"kind": kind, "objects": [_object(c, s, size=z, position=p)]}
                for z, c, s, p in itertools.product(SIZES, COLOURS, SHAPES, POSITIONS)]
    if kind == "relation":
        return [{"kind": kind, "objects": [_object(c1, s1), _object(c2, s2)], "relation": rel}
                for c1, s1, rel, c2, s2 in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES)
                if c1 != c2]
    return [{"kind": kind, "objects": [_object(c, s)], "relation": side}
            for c, s, side in itertools.product(COLOURS, SHAPES, MIRROR_SIDES)]


PROMPT_SET_SIZES = {"single": 24, "relation": 16, "mirror": 12}
PROMPT_SET_SEED = 20240601


def _prompt_set(index):
    chosen = []
    for offset, (kind, count) in enumerate(PROMPT_SET_SIZES.items()):
        specs = all_specs(kind)
        order = np.random.default_rng(PROMPT_SET_SEED + offset).permutation(len(specs))
        chosen += [(prompt_for(specs[i]), specs[i]) for i in order[index * count:(index + 1) * count]]
    return chosen


def dev_prompts():
    """Fixed (prompt, spec) list for tuning: 24 single, 16 relation, 12 mirror."""
    return _prompt_set(0)


def validation_prompts():
    """Fixed (prompt, spec) list for reporting, disjoint from ``dev_prompts``."""
    return _prompt_set(1)


def training_prompts():
    """Fixed (prompt, spec) list for training on the toy model's own samples, disjoint from dev and validation."""
    return _prompt_set(2)
