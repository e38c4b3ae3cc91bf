"""Toy world v2: deterministic procedural 64x64 RGB scenes described by a fixed grammar.

Design and reasons: docs/toyworld.md (section "Toy world v2").  In short:

* objects: colour (10, with near-hue pairs), texture (plain, striped, dotted, checked; "plain" is
  never written), shape (circle, square, triangle, diamond, cross); single objects also have a
  size and a position;
* ``single``   -- "a large red striped circle on the left"
* ``relation`` -- two objects in a spatial relation (left of, right of, above, below), the physical
  support relation "on" (the first object rests on the second: contact), or three objects
  "a red circle between a blue square and a green cross" (horizontal);
* ``implied``  -- one object "on the floor" (it casts a shadow to its lower right, the light is at
  the upper left) or "above a mirror" (a horizontal mirror line reflects it, dimmer, flipped).
  The prompt never names the shadow or the reflection: they are implied elements.

A *spec* is a JSON-serialisable dict holding exactly what the prompt says, so
``parse_prompt(prompt_for(spec)) == spec``.  Everything the prompt leaves open (placement,
sizes outside ``single``) is drawn by ``render`` from its ``rng``.

Rendering: every object is centred on a pixel centre, its coverage is measured with 4x4
supersampling (anti-aliased outlines), and its texture is drawn pixel-aligned in white ink inside
a one-pixel solid rim, so an object's colour pixels stay one connected component and the
pattern holds no blended pixels (the oracle stays exact).

``prompt_set(index)``: fixed (prompt, spec) lists; slices 0, 1, 2 are dev, validation and
training; slices 3 and above are never used inside this repository (kept for outside checks).
"""

import copy
import functools
import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

IMAGE_SIZE = 64
SUPERSAMPLE = 4
BACKGROUND = (24, 24, 32)
INK = (240, 240, 240)
FLOOR = (150, 138, 120)
SHADOW = (72, 66, 58)
MIRROR = (176, 186, 204)
FLOOR_TOP = 40
"""First row of the floor band in ``on the floor`` scenes."""
MIRROR_ROWS = (35, 36)
"""The two rows of the mirror line; the mirror axis is their shared edge y = 36.0."""
MIRROR_AXIS = 36.0
REFLECTION_SHADE = 0.55
PALETTE = {
    "red": (220, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (235, 215, 40),
    "lime": (150, 215, 40),
    "green": (40, 170, 60),
    "teal": (20, 140, 130),
    "cyan": (50, 200, 230),
    "blue": (50, 80, 230),
    "purple": (145, 60, 215),
    "pink": (240, 110, 190),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
TEXTURES = ("plain", "striped", "dotted", "checked")
SIZES = ("small", "large")
HALF_EXTENT = {"small": 7.5, "large": 11.5}
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "center": "in the center"}
POSITION_OFFSET = {"left": (-16, 0), "right": (16, 0), "top": (0, -16), "bottom": (0, 16), "center": (0, 0)}
POSITION_JITTER = (-3, 4)
"""Centre jitter range (inclusive) around 31.5 + offset: symmetric about the image centre 32."""
BINARY_RELATIONS = ("left of", "right of", "above", "below", "on")
RELATIONS = (*BINARY_RELATIONS, "between")
SETTINGS = ("floor", "mirror")
SETTING_PHRASE = {"floor": "on the floor", "mirror": "above a mirror"}
KINDS = ("single", "relation", "implied")
RELATION_GAP = 4
"""Minimum gap in pixels between the objects of a generated spatial relation along its axis."""
SHADOW_OFFSET = 0.7
SHADOW_WIDTH = 1.2
SHADOW_HEIGHT = 0.35

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
GRAMMAR_WORDS = sorted({"a", "an", "of", "between", "and", *COLOURS, *TEXTURES[1:], *SHAPES, *SIZES,
                        *(w for phrase in (*POSITION_PHRASE.values(), *SETTING_PHRASE.values(), *RELATIONS)
                          for w in phrase.split())})
VOCAB = [PAD, EOS, UNK, *GRAMMAR_WORDS]
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
MAX_TOKENS = 20


@dataclass
class Scene:
    spec: dict
    prompt: str
    image: np.ndarray  # uint8 HxWx3


def words(text):
    """The tokenizer's words of ``text``: lower-cased, punctuation split off."""
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def word_id(word):
    """A word's token id (UNK for words outside the grammar)."""
    return TOKEN_ID.get(word, TOKEN_ID[UNK])


def tokenize(prompt):
    """Lower-cased word ids (punctuation split off, unknown words -> UNK), then EOS, right-padded with
    PAD = 0 to ``MAX_TOKENS`` (longer prompts are cut, keeping EOS last)."""
    ids = [word_id(word) for word in words(prompt)][:MAX_TOKENS - 1] + [TOKEN_ID[EOS]]
    return ids + [TOKEN_ID[PAD]] * (MAX_TOKENS - len(ids))


# ---------------------------------------------------------------- specs and prompts

def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def sample_object(rng, exclude_colours=()):
    """A random {colour, texture, shape} object, its colour not in ``exclude_colours``."""
    colour = _pick(rng, [c for c in COLOURS if c not in exclude_colours])
    return {"colour": colour, "texture": _pick(rng, TEXTURES), "shape": _pick(rng, SHAPES)}


def sample_spec(rng, kind):
    """A random spec of the given kind (uniform over each choice; relation objects have distinct colours)."""
    if kind == "single":
        return {"kind": kind, "objects": [{**sample_object(rng), "size": _pick(rng, SIZES),
                                           "position": _pick(rng, POSITIONS)}]}
    if kind == "relation":
        relation = _pick(rng, RELATIONS)
        objects = []
        for _ in range(3 if relation == "between" else 2):
            objects.append(sample_object(rng, [o["colour"] for o in objects]))
        return {"kind": kind, "objects": objects, "relation": relation}
    if kind == "implied":
        return {"kind": kind, "objects": [sample_object(rng)], "setting": _pick(rng, SETTINGS)}
    raise ValueError(f"unknown scene kind {kind!r}")


ALTERABLE = {"single": ("colour", "shape", "texture", "size", "position"),
             "relation": ("colour", "shape", "texture", "relation", "binding"),
             "implied": ("colour", "shape", "texture", "relation")}
"""What ``alter_spec`` can change per kind ("binding" swaps two objects' colours; an implied spec's
"relation" is its setting)."""


def alter_spec(spec, fact, rng, target=None):
    """A copy of ``spec`` that differs in exactly one prompt fact (one object's colour, shape or texture,
    that of object ``target`` when given; the size, position, relation or setting; or, for "binding",
    the colours of two objects swapped)."""
    if fact not in ALTERABLE[spec["kind"]]:
        raise ValueError(f"alter_spec: 'fact' {fact!r} is not alterable in a {spec['kind']} spec")
    spec = copy.deepcopy(spec)
    objects = spec["objects"]
    target = objects[int(rng.integers(len(objects))) if target is None else target]
    if fact == "colour":
        target["colour"] = _pick(rng, [c for c in COLOURS if c not in {o["colour"] for o in objects}])
    elif fact in ("shape", "texture", "size", "position"):
        options = {"shape": SHAPES, "texture": TEXTURES, "size": SIZES, "position": POSITIONS}[fact]
        target[fact] = _pick(rng, [o for o in options if o != target[fact]])
    elif fact == "binding":
        first, second = rng.choice(len(objects), size=2, replace=False)
        objects[first]["colour"], objects[second]["colour"] = objects[second]["colour"], objects[first]["colour"]
    elif spec["kind"] == "implied":
        spec["setting"] = _pick(rng, [s for s in SETTINGS if s != spec["setting"]])
    elif spec["relation"] == "between":
        objects[0], objects[1] = objects[1], objects[0]
    else:
        spec["relation"] = _pick(rng, [r for r in BINARY_RELATIONS if r != spec["relation"]])
    return spec


def object_phrase(obj, size=None):
    """'a red striped circle', 'an orange cross', 'a large blue dotted square' (plain texture unwritten)."""
    words = [w for w in (size, obj["colour"], None if obj["texture"] == "plain" else obj["texture"], obj["shape"])
             if w]
    return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def prompt_for(spec):
    """The prompt sentence for a spec."""
    objects = spec["objects"]
    if spec["kind"] == "single":
        return f"{object_phrase(objects[0], objects[0]['size'])} {POSITION_PHRASE[objects[0]['position']]}"
    if spec["kind"] == "implied":
        return f"{object_phrase(objects[0])} {SETTING_PHRASE[spec['setting']]}"
    first, second = object_phrase(objects[0]), object_phrase(objects[1])
    if spec["relation"] == "between":
        return f"{first} between {second} and {object_phrase(objects[2])}"
    return f"{first} {spec['relation']} {second}"


_OBJECT_PATTERN = (r"an? (?:(?P<size{i}>small|large) )?(?P<colour{i}>{colours}) (?:(?P<texture{i}>{textures}) )?"
                   r"(?P<shape{i}>{shapes})")


@functools.cache
def _grammar():
    """(compiled regex, kind, fixed fields) per sentence form, for ``parse_prompt``."""
    def obj(i):
        return _OBJECT_PATTERN.format(i=i, colours="|".join(COLOURS), textures="|".join(TEXTURES[1:]),
                                      shapes="|".join(SHAPES))
    forms = [(f"{obj(0)} (?P<position>{'|'.join(POSITION_PHRASE.values())})", "single"),
             (f"{obj(0)} (?P<setting>{'|'.join(SETTING_PHRASE.values())})", "implied"),
             (f"{obj(0)} between {obj(1)} and {obj(2)}", "relation"),
             (f"{obj(0)} (?P<relation>{'|'.join(BINARY_RELATIONS)}) {obj(1)}", "relation")]
    return [(re.compile(pattern + "$"), kind) for pattern, kind in forms]


def parse_prompt(prompt):
    """Inverse of ``prompt_for``; raises ValueError for sentences outside the grammar."""
    sentence = " ".join(prompt.lower().split())
    for pattern, kind in _grammar():
        match = pattern.match(sentence)
        if match is None:
            continue
        fields = match.groupdict()
        count = sum(1 for key in fields if key.startswith("shape"))
        objects = [{"colour": fields[f"colour{i}"], "texture": fields[f"texture{i}"] or "plain",
                    "shape": fields[f"shape{i}"]} for i in range(count)]
        spec = {"kind": kind, "objects": objects}
        if kind == "single":
            if fields["size0"] is None:
                break
            objects[0]["size"] = fields["size0"]
            objects[0]["position"] = {v: k for k, v in POSITION_PHRASE.items()}[fields["position"]]
        elif any(fields.get(f"size{i}") for i in range(count)):
            break
        elif kind == "implied":
            spec["setting"] = {v: k for k, v in SETTING_PHRASE.items()}[fields["setting"]]
        else:
            spec["relation"] = fields.get("relation") or "between"
            if len({o["colour"] for o in objects}) < count:
                break
        if prompt_for(spec) == sentence:
            return spec
        break
    raise ValueError(f"prompt outside the toy world v2 grammar: {prompt!r}")


# ---------------------------------------------------------------- geometry

def cross_half_arm(r):
    """Half width of a cross's arms: a third of the half extent, on the half-pixel grid (2.5 small, 3.5 large)."""
    return round(r / 3 - 0.5) + 0.5


def inside(shape, dx, dy, r):
    """Whether offsets (dx, dy) from a shape's centre lie inside it (half extent r; triangles point up)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= r
    if shape == "triangle":
        return (ay <= r) & (2 * ax <= dy + r)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        arm = cross_half_arm(r)
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


_SUB = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE


def _coverage(test, cx, cy, rx, ry, size=IMAGE_SIZE):
    """HxW float32 fraction of each pixel's 4x4 subsamples where ``test(dx, dy)`` holds, for offsets from
    (cx, cy) within the box of half sizes (rx, ry); pixel (i, j) spans [j, j+1] x [i, i+1]."""
    out = np.zeros((size, size), np.float32)
    x0, x1 = max(0, math.floor(cx - rx) - 1), min(size, math.ceil(cx + rx) + 1)
    y0, y1 = max(0, math.floor(cy - ry) - 1), min(size, math.ceil(cy + ry) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    xs = (np.arange(x0, x1)[:, None] + _SUB).reshape(-1) - cx
    ys = (np.arange(y0, y1)[:, None] + _SUB).reshape(-1) - cy
    hits = test(xs[None, :], ys[:, None])
    out[y0:y1, x0:x1] = hits.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return out


def coverage(shape, cx, cy, r, flip=False):
    """HxW float32 coverage of a shape of half extent r centred at continuous (cx, cy); ``flip``
    mirrors it vertically about its centre."""
    return _coverage(lambda dx, dy: inside(shape, dx, -dy if flip else dy, r), cx, cy, r, r)


def pattern(texture, cx, cy, size=IMAGE_SIZE):
    """HxW bool ink pattern of a texture, anchored on the centre pixel (floor(cx), floor(cy)):
    striped = rows of 3 alternating, checked = 3x3 squares, dotted = plus-shaped dots on a quincunx
    lattice of period 6 (the centre pixel is never ink)."""
    v, u = np.mgrid[0:size, 0:size]
    u, v = u - math.floor(cx), v - math.floor(cy)
    if texture == "plain":
        return np.zeros((size, size), bool)
    if texture == "striped":
        return (v + 1) // 3 % 2 == 1
    if texture == "checked":
        return ((u + 1) // 3 + (v + 1) // 3) % 2 == 1
    if texture == "dotted":
        du, dv = (u + 3) % 6 - 3, (v + 3) % 6 - 3
        su, sv = u % 6 - 3, v % 6 - 3
        return (np.abs(du) + np.abs(dv) <= 1) | (np.abs(su) + np.abs(sv) <= 1)
    raise ValueError(f"unknown texture {texture!r}")


_EIGHT = np.ones((3, 3), bool)


def object_layers(obj, cx, cy, r, flip=False):
    """(coverage HxW, colour HxWx3 float) of one object: its colour with white ink on the texture
    pattern inside a one-pixel solid rim."""
    cover = coverage(obj["shape"], cx, cy, r, flip)
    interior = ndimage.binary_erosion(cover >= 1.0, _EIGHT, border_value=0)
    ink = interior & pattern(obj["texture"], cx, cy)
    colour = np.where(ink[..., None], np.array(INK, np.float32), np.array(PALETTE[obj["colour"]], np.float32))
    return cover, colour


def composite(image, cover, colour):
    """Paint a layer over a float image in place (alpha = coverage)."""
    image += cover[..., None] * (colour - image)


def _quantise(image):
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- placement

def _pixel_centre(rng, low, high):
    """A pixel-centre coordinate k + 0.5 with low <= k + 0.5 <= high (both continuous)."""
    return int(rng.integers(math.ceil(low - 0.5), math.floor(high - 0.5) + 1)) + 0.5


def _random_centre(rng, r):
    return _pixel_centre(rng, r, IMAGE_SIZE - r), _pixel_centre(rng, r, IMAGE_SIZE - r)


def relation_holds(relation, a, b):
    """Whether centre a = (x, y) stands in spatial ``relation`` to centre b (dominant axis, 2 px margin)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 2 and along > abs(across)


def _random_radii(rng, count):
    return [HALF_EXTENT[_pick(rng, SIZES)] for _ in range(count)]


def _place_spatial(relation, rng):
    """Two placements in a spatial relation: dominant axis with margin, a gap of RELATION_GAP along it."""
    axis = 0 if relation in ("left of", "right of") else 1
    while True:
        radii = _random_radii(rng, 2)
        centres = [_random_centre(rng, r) for r in radii]
        along = abs(centres[0][axis] - centres[1][axis])
        across = abs(centres[0][1 - axis] - centres[1][1 - axis])
        if (along - radii[0] - radii[1] >= RELATION_GAP and along >= 1.5 * across + 2
                and relation_holds(relation, *centres)):
            return [(*c, r) for c, r in zip(centres, radii)]


def _supersampled(shape, cx, cy, r):
    """Boolean supersampled mask of a shape on the whole image (SUPERSAMPLE x the resolution)."""
    grid = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    return inside(shape, grid[None, :] - cx, grid[:, None] - cy, r)


def _place_on(objects, rng):
    """The first object resting on the second: its centre over the base's middle half, lowered pixel
    by pixel from the touching bounding boxes until one more pixel would make the shapes overlap."""
    while True:
        r_top, r_base = _random_radii(rng, 2)
        base_x = _pixel_centre(rng, r_base, IMAGE_SIZE - r_base)
        base_y = _pixel_centre(rng, r_base + 2 * r_top, IMAGE_SIZE - r_base)
        top_x = base_x + int(rng.integers(-math.floor(r_base / 2), math.floor(r_base / 2) + 1))
        if not r_top <= top_x <= IMAGE_SIZE - r_top:
            continue
        base = _supersampled(objects[1]["shape"], base_x, base_y, r_base)
        top_y = base_y - r_base - r_top
        while not (base & _supersampled(objects[0]["shape"], top_x, top_y + 1, r_top)).any():
            top_y += 1
        return [(top_x, top_y, r_top), (base_x, base_y, r_base)]


def _place_between(rng):
    """Three placements in a row, the first object in the middle: gaps of at least RELATION_GAP,
    each centre within 3 px of a common row (so the row dominates every pair)."""
    while True:
        radii = _random_radii(rng, 3)
        gaps = [int(rng.integers(RELATION_GAP, RELATION_GAP + 6)) for _ in range(2)]
        order = [1, 0, 2] if rng.integers(2) else [2, 0, 1]  # left-to-right object indices
        width = sum(2 * radii[i] for i in order) + sum(gaps)
        if width > IMAGE_SIZE:
            continue
        left = int(rng.integers(0, IMAGE_SIZE - width + 1))
        row = _pixel_centre(rng, max(radii) + 3, IMAGE_SIZE - max(radii) - 3)
        placements, x = [None] * 3, left
        for slot, index in enumerate(order):
            r = radii[index]
            placements[index] = (x + r, row + int(rng.integers(-3, 4)), r)
            x += 2 * r + (gaps[slot] if slot < 2 else 0)
        return placements


def _place_single(obj, rng):
    r = HALF_EXTENT[obj["size"]]
    ox, oy = POSITION_OFFSET[obj["position"]]
    cx, cy = (31.5 + o + int(rng.integers(POSITION_JITTER[0], POSITION_JITTER[1] + 1)) for o in (ox, oy))
    return cx, cy, r


def shadow_coverage(cx, bottom, r):
    """Coverage of the shadow of an object of half extent r centred at column cx and standing on row
    boundary ``bottom``: a flat ellipse offset to the lower right, clipped to the floor band."""
    a, b = SHADOW_WIDTH * r, SHADOW_HEIGHT * r + 1.0
    cover = _coverage(lambda dx, dy: (dx / a) ** 2 + (dy / b) ** 2 <= 1.0, cx + SHADOW_OFFSET * r, bottom - 1.0, a, b)
    cover[:FLOOR_TOP] = 0.0
    return cover


def render(spec, rng):
    """Render a spec to a uint8 HxWx3 image, drawing open placement choices from ``rng``."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32) + np.array(BACKGROUND, np.float32)
    objects = spec["objects"]
    if spec["kind"] == "single":
        placements = [_place_single(objects[0], rng)]
    elif spec["kind"] == "relation":
        relation = spec["relation"]
        placements = (_place_between(rng) if relation == "between" else _place_on(objects, rng) if relation == "on"
                      else _place_spatial(relation, rng))
    else:
        return _render_implied(spec, rng, image)
    for obj, (cx, cy, r) in zip(objects, placements):
        composite(image, *object_layers(obj, cx, cy, r))
    return _quantise(image)


def _render_implied(spec, rng, image):
    obj = spec["objects"][0]
    r = HALF_EXTENT[_pick(rng, SIZES)]
    if spec["setting"] == "floor":
        image[FLOOR_TOP:] = FLOOR
        cx = _pixel_centre(rng, r, IMAGE_SIZE - (SHADOW_OFFSET + SHADOW_WIDTH) * r)
        bottom = int(rng.integers(FLOOR_TOP + 4, IMAGE_SIZE - 2))
        composite(image, shadow_coverage(cx, bottom, r), np.array(SHADOW, np.float32))
        composite(image, *object_layers(obj, cx, bottom - r, r))
        return _quantise(image)
    image[MIRROR_ROWS[0]:MIRROR_ROWS[1] + 1] = MIRROR
    cx = _pixel_centre(rng, r, IMAGE_SIZE - r)
    largest_gap = min(6, int(IMAGE_SIZE - 2 * MIRROR_AXIS + MIRROR_ROWS[0] - 2 * r))  # the reflection fits
    gap = int(rng.integers(1, largest_gap + 1))
    cy = MIRROR_ROWS[0] - gap - r
    cover, colour = object_layers(obj, cx, cy, r)
    reflected_cover, reflected_colour = object_layers(obj, cx, 2 * MIRROR_AXIS - cy, r, flip=True)
    composite(image, cover, colour)
    composite(image, reflected_cover, reflected_colour * REFLECTION_SHADE)
    return _quantise(image)


def sample_scene(rng, kind=None):
    """A random scene; ``kind`` None picks one of KINDS uniformly."""
    kind = kind or _pick(rng, KINDS)
    spec = sample_spec(rng, kind)
    return Scene(spec=spec, prompt=prompt_for(spec), image=render(spec, rng))


# ---------------------------------------------------------------- fixed prompt sets

SLICE_SIZES = {"single": 24, "relation": 24, "implied": 16}
PROMPT_SET_SEED = 20250220
DEV, VALIDATION, TRAINING = 0, 1, 2


def spec_count(kind):
    """Number of distinct specs (prompts) of a kind."""
    objects = len(COLOURS) * len(TEXTURES) * len(SHAPES)
    per_colour = len(TEXTURES) * len(SHAPES)
    if kind == "single":
        return objects * len(SIZES) * len(POSITIONS)
    if kind == "implied":
        return objects * len(SETTINGS)
    if kind == "relation":
        second, third = (len(COLOURS) - 1) * per_colour, (len(COLOURS) - 2) * per_colour
        return objects * second * (len(BINARY_RELATIONS) + third)
    raise ValueError(f"unknown scene kind {kind!r}")


def slice_count(kind):
    """Number of full prompt-set slices the kind's specs fill."""
    return spec_count(kind) // SLICE_SIZES[kind]


@functools.cache
def _unique_stream(kind, length):
    """The first ``length`` distinct specs of a kind's fixed pseudo-random stream (stable prefixes)."""
    seen, specs = set(), []
    for draw in itertools.count():
        if len(specs) == length:
            return tuple((prompt_for(spec), spec) for spec in specs)
        spec = sample_spec(np.random.default_rng([PROMPT_SET_SEED, KINDS.index(kind), draw]), kind)
        if prompt_for(spec) not in seen:
            seen.add(prompt_for(spec))
            specs.append(spec)


def prompt_set(index):
    """Slice ``index`` of the fixed prompt sets: a (prompt, spec) list with SLICE_SIZES of each kind,
    disjoint from every other slice.  0 = dev (tuning), 1 = validation (reporting), 2 = training
    (training on the model's own samples); 3 and above are for outside checks only."""
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"prompt_set: 'index' must be a non-negative integer, got {index!r}")
    chosen = []
    for kind, count in SLICE_SIZES.items():
        if index >= slice_count(kind):
            raise ValueError(f"prompt_set: 'index' {index} is past the {slice_count(kind)} full slices of {kind}")
        chosen += [(prompt, copy.deepcopy(spec)) for prompt, spec in _unique_stream(kind, (index + 1) * count)[-count:]]
    return chosen


def dev_prompts():
    return prompt_set(DEV)


def validation_prompts():
    return prompt_set(VALIDATION)


def training_prompts():
    return prompt_set(TRAINING)
