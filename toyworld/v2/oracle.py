"""Exact programmatic judge of toy world v2 images against specs (model-free), with per-fact verdicts.

Method:

1. Every pixel takes the name of the nearest reference when it lies within ``MAX_COLOUR_DISTANCE``:
   the palette colour whose blend line with the local background (wall, or floor band) passes
   nearest, when the pixel is at least ``HALF_MAX`` along it (a dim or blurred edge, a reflection);
   white ink, the background, and the setting's floor and shadow, or mirror and reflection shades.
2. The 8-connected components of one colour name (at least ``MIN_PIXELS``) are that colour's
   objects; the largest is "the" object of an asked colour.
3. An object's *core* is its half-maximum region along the local background -> colour axis (it
   follows the sharp outline also when a model blurs it): the connected region of strong pixels
   around its component that are of its colour, blends of ink with its colour (rather than with
   another colour), or unclaimed (background, floor, unnamed) and nearest to the line from the
   background to its colour among all colours' lines; holes filled (the texture's ink).
   Its bounding box gives centre, extent (size) and position.
4. Shape: the template (rendered with the generator's own geometry at the core's centre and half
   extent) with the largest intersection-over-union, if at least ``MIN_SHAPE_IOU``.
5. Texture, inside the core eroded by one pixel: ink = pixels at least half-way from the colour
   to white.  Plain: ink fraction under ``PLAIN_INK``; dotted: under ``SOLID_INK`` of the ink lies
   in 2x2 all-ink blocks (a dot is a plus of five pixels); striped: rows nearly pure ink or pure
   colour (``STRIPE_PURITY``); else checked.

Facts per kind (``pass`` = all of them; a fact about several objects holds when it holds for each):
  single    colour (the asked colour's object has the largest core), shape, texture, size, position
  relation  colour (every asked colour present), shape, texture, relation (spatial relations by
            the centres' dominant axis, "above"/"below" without contact; "on": contact from above
            with the upper centre over the lower object; "between": horizontally between)
  implied   colour, shape, texture, relation (the floor band present and the object standing on it,
            or the mirror line present and the object above it), implied (the shadow at its place,
            or a dimmer reflection of the same shape at the mirrored place)
"""

import numpy as np
from scipy import ndimage

from . import scenes

MAX_COLOUR_DISTANCE = 70.0
MIN_PIXELS = 12
HALF_MAX = 0.45
"""Core threshold (fraction of the peak strength); just under 0.5 so a pixel half covered by the
generator (a triangle's apex) is in the core for every colour despite rounding to uint8."""
INK_BLEND_DISTANCE = 40.0
MIN_SHAPE_IOU = 0.6
MAX_ASPECT = 1.5
LARGE_EXTENT = 19
CENTER_ZONE = 8.0
MIN_TEXTURE_PIXELS = 8
PLAIN_INK = 0.05
SOLID_INK = 0.3
STRIPE_PURITY = 0.8
NO_CONTACT_GAP = 3
CONTACT_GAP = (-1, 2)
FLOOR_PRESENT = 0.4
FLOOR_STANDING_MARGIN = 2
SHADOW_VISIBLE = 0.5
MIN_SHADOW_PIXELS = 6
MIRROR_BAND = slice(scenes.MIRROR_ROWS[0] - 1, scenes.MIRROR_ROWS[1] + 2)
MIRROR_SEARCH = slice(scenes.MIRROR_ROWS[0] - 3, scenes.MIRROR_ROWS[1] + 4)
MIRROR_LINE_PIXELS = 40
MIRROR_DISTANCE = 100.0
"""A mirror-line pixel lies this close to MIRROR (a blurred two-row line dims towards the background)."""
MIRROR_TOLERANCE = 3.0

_SETTING_REFERENCES = {
    None: [("ink", scenes.INK), ("background", scenes.BACKGROUND)],
    "floor": [("ink", scenes.INK), ("background", scenes.BACKGROUND), ("floor", scenes.FLOOR),
              ("shadow", scenes.SHADOW)],
    "mirror": [("ink", scenes.INK), ("background", scenes.BACKGROUND), ("mirror", scenes.MIRROR)]
              + [(name, tuple(c * scenes.REFLECTION_SHADE for c in rgb))
                 for name, rgb in (*scenes.PALETTE.items(), ("ink", scenes.INK))],
}
"""Reference colours besides the palette's blend lines, per setting (the reflection shades of a mirror
scene are named by their colour): a scene is named only with colours it can hold (elsewhere a
blurred edge or a blend of two colours could find a floor, shadow, mirror or shade nearer than
anything the scene holds)."""
NAMES = sorted({*scenes.COLOURS, *(name for references in _SETTING_REFERENCES.values() for name, _ in references)})
_UNNAMED = len(NAMES)
_EIGHT = np.ones((3, 3), bool)
_INK = np.array(scenes.INK, np.float32)


def to_uint8(image):
    """HxWx3 uint8, or float in [0, 1] (ComfyUI IMAGE), or a torch tensor -> uint8 numpy."""
    image = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return image


def backdrop(setting=None):
    """HxWx3 float32 local background of a setting: the wall, and the floor band in "floor" scenes."""
    background = np.zeros((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), np.float32) + np.array(scenes.BACKGROUND)
    if setting == "floor":
        background[scenes.FLOOR_TOP:] = scenes.FLOOR
    return background


def palette_lines(image, background):
    """(owner, distance, strength), each HxW: the palette colour (index into COLOURS) whose segment from
    the local background passes nearest each pixel, that distance, and the pixel's blend weight along
    it (1 = the pure colour)."""
    pixels = image.astype(np.float32)[..., None, :] - background[..., None, :]
    axes = np.array([scenes.PALETTE[c] for c in scenes.COLOURS], np.float32) - background[..., None, :]
    strengths = (pixels * axes).sum(-1) / (axes * axes).sum(-1)
    distances = np.linalg.norm(pixels - np.clip(strengths, 0.0, 1.0)[..., None] * axes, axis=-1)
    owner = distances.argmin(-1)
    pick = owner[..., None]
    return owner, np.take_along_axis(distances, pick, -1)[..., 0], np.take_along_axis(strengths, pick, -1)[..., 0]


def name_indices(image, setting=None):
    """HxW index into NAMES of each pixel's nearest reference: the palette colour of the nearest
    background-to-colour segment when the pixel is at least HALF_MAX along it (a blurred or dim edge
    keeps its colour's name, a faint one is no colour), or a reference colour of the setting;
    ``len(NAMES)`` where none is within MAX_COLOUR_DISTANCE."""
    owner, line_distance, strength = palette_lines(image, backdrop(setting))
    references = _SETTING_REFERENCES[setting]
    point_distances = np.linalg.norm(image.astype(np.float32)[..., None, :]
                                     - np.array([rgb for _, rgb in references], np.float32), axis=-1)
    nearest_point = point_distances.argmin(-1)
    point_names = np.array([NAMES.index(name) for name, _ in references])[nearest_point]
    point_distance = point_distances.min(-1)
    line_distance = np.where(strength >= HALF_MAX, line_distance, np.inf)
    colour_names = np.array([NAMES.index(c) for c in scenes.COLOURS])[owner]
    names = np.where(line_distance <= point_distance, colour_names, point_names)
    return np.where(np.minimum(line_distance, point_distance) <= MAX_COLOUR_DISTANCE, names, _UNNAMED)


def ink_blend_colour(image, shade=1.0):
    """HxW index into COLOURS of the colour whose blend with white ink (both times ``shade``) each pixel
    is (a blurred texture): the nearest such segment within INK_BLEND_DISTANCE, short of its last
    fifth (pure ink is no evidence of a colour); -1 elsewhere."""
    colours = np.array([scenes.PALETTE[c] for c in scenes.COLOURS], np.float32) * shade
    axes = _INK * shade - colours
    offsets = image.astype(np.float32)[..., None, :] - colours
    along = (offsets * axes).sum(-1) / (axes * axes).sum(-1)
    distances = np.linalg.norm(offsets - np.clip(along, 0.0, 1.0)[..., None] * axes, axis=-1)
    distances[along > 0.8] = np.inf
    nearest = distances.argmin(-1)
    return np.where(distances.min(-1) <= INK_BLEND_DISTANCE, nearest, -1)


def classify_shape(core, centre, half_extent, flip=False):
    """(shape, IoU) of the best-matching template, shape None under MIN_SHAPE_IOU."""
    best = max(((float((core & template).sum() / max(1, (core | template).sum())), shape)
                for shape in scenes.SHAPES
                for template in [scenes.coverage(shape, *centre, half_extent, flip) >= 0.5]))
    return (best[1] if best[0] >= MIN_SHAPE_IOU else None), best[0]


def classify_texture(image, core, colour):
    """Texture name of the core's interior (one-pixel erosion), None when too small to tell."""
    interior = ndimage.binary_erosion(core, _EIGHT)
    if interior.sum() < MIN_TEXTURE_PIXELS:
        return None
    colour = np.array(colour, np.float32)
    axis = _INK - colour
    ink = ((image.astype(np.float32) - colour) @ axis / (axis @ axis) >= 0.5) & interior
    if ink.sum() < PLAIN_INK * interior.sum():
        return "plain"
    blocks = ink[:-1, :-1] & ink[1:, :-1] & ink[:-1, 1:] & ink[1:, 1:]
    in_blocks = ndimage.binary_dilation(np.pad(blocks, ((0, 1), (0, 1))), np.ones((2, 2), bool), origin=(-1, -1))
    if (in_blocks & ink).sum() < SOLID_INK * ink.sum():
        return "dotted"
    ink_rows, rows = ink.sum(axis=1), interior.sum(axis=1)
    purity = np.maximum(ink_rows, rows - ink_rows).sum() / interior.sum()
    return "striped" if purity >= STRIPE_PURITY else "checked"


class Blob:
    """One detected object: pixel count and mean brightness of its component; core (see module
    docstring) with its bounding box, centre, half extent, shape and texture."""

    def __init__(self, analysis, component, colour, reflection=False):
        image = analysis.image
        shade = scenes.REFLECTION_SHADE if reflection else 1.0
        self.colour, self.pixels = colour, int(component.sum())
        self.brightness = float(image[component].astype(np.float32).mean())
        background = analysis.background
        axis = np.array(scenes.PALETTE[colour], np.float32) - background
        strength = ((image.astype(np.float32) - background) * axis).sum(-1) / (axis * axis).sum(-1)
        strong = strength >= HALF_MAX * np.percentile(strength[component], 90)
        names = analysis.objects
        index = scenes.COLOURS.index(colour)
        growable = strong & ((analysis.unclaimed & (analysis.edge_colour == index)) | (names == NAMES.index(colour))
                             | (analysis.ink_blend_colour(shade) == index))
        seed = component & strong
        self.core = np.zeros_like(seed)
        if seed.any():
            labels, _ = ndimage.label(growable | seed, structure=_EIGHT)
            self.core = ndimage.binary_fill_holes(labels == labels[seed][0])
        if not self.core.any():
            self.box, self.centre, self.half_extent, self.shape, self.texture = None, (-1.0, -1.0), 0.0, None, None
            return
        ys, xs = np.nonzero(self.core)
        self.box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        width, height = self.box[2] - self.box[0] + 1, self.box[3] - self.box[1] + 1
        self.centre = ((self.box[0] + self.box[2] + 1) / 2.0, (self.box[1] + self.box[3] + 1) / 2.0)
        self.half_extent = max(width, height) / 2.0
        if max(width, height) > MAX_ASPECT * min(width, height):
            self.shape = None
        else:
            self.shape, _ = classify_shape(self.core, self.centre, self.half_extent, flip=reflection)
        self.texture = None if reflection else classify_texture(image, self.core, scenes.PALETTE[colour])

    @property
    def size(self):
        return "large" if 2 * self.half_extent >= LARGE_EXTENT else "small"

    @property
    def position(self):
        dx, dy = (c - scenes.IMAGE_SIZE / 2.0 for c in self.centre)
        if max(abs(dx), abs(dy)) < CENTER_ZONE:
            return "center"
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


class Analysis:
    """Named pixels and per-colour components of one image, blobs on demand.  ``setting`` ("floor",
    "mirror" or None) fixes the expected backdrop and reference colours: the floor band's colour is
    the local background below FLOOR_TOP; the mirror band's rows belong to no object."""

    def __init__(self, image, setting=None):
        self.image = to_uint8(image)
        self.names = name_indices(self.image, setting)
        self.background = backdrop(setting)
        self.objects = objects = self.names.copy()
        self.unclaimed = np.isin(objects, [NAMES.index("background"), NAMES.index("floor"), _UNNAMED])
        if setting == "mirror":
            objects[MIRROR_BAND] = _UNNAMED
            self.unclaimed[MIRROR_BAND] = False
        self.components, claimed = {}, np.zeros(self.names.shape, bool)
        for colour in scenes.COLOURS:
            labels, count = ndimage.label(objects == NAMES.index(colour), structure=_EIGHT)
            if count:
                sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, count + 1))
                self.components[colour] = [labels == 1 + i for i in np.argsort(-sizes, kind="stable")
                                           if sizes[i] >= MIN_PIXELS]
                for mask in self.components[colour]:
                    claimed |= mask
        self.unclaimed &= ~claimed
        self.edge_colour = palette_lines(self.image, self.background)[0]
        self._ink_blends, self._blobs = {}, {}

    def blobs(self, colour, reflection=False):
        """Blobs of a colour, largest component first (``reflection``: judged as dimmer vertical reflections)."""
        if (colour, reflection) not in self._blobs:
            self._blobs[colour, reflection] = [Blob(self, m, colour, reflection)
                                               for m in self.components.get(colour, [])]
        return self._blobs[colour, reflection]

    def ink_blend_colour(self, shade):
        if shade not in self._ink_blends:
            self._ink_blends[shade] = ink_blend_colour(self.image, shade)
        return self._ink_blends[shade]

    def blob(self, colour):
        return next(iter(self.blobs(colour)), None)

    def objects_outside(self, core):
        """Per colour, the blob of its largest component lying mostly outside ``core`` (blends inside
        a blurred textured object can take another colour's name: they are not objects)."""
        for colour, masks in self.components.items():
            outside = next((m for m in masks if (m & core).sum() < 0.5 * m.sum()), None)
            if outside is not None:
                yield Blob(self, outside, colour)

    def largest_object(self):
        """The blob with the largest core, None in an empty image."""
        return max(self.objects_outside(np.zeros(self.names.shape, bool)), key=lambda b: b.core.sum(), default=None)

    def count(self, name, where=np.s_[:]):
        return int((self.names[where] == NAMES.index(name)).sum())


def vertical_gap(upper, lower):
    """Smallest gap in rows between the upper core's bottom and the lower core's top over the columns
    both occupy (negative: they overlap); None when they share no column."""
    columns = upper.core.any(axis=0) & lower.core.any(axis=0)
    if not columns.any():
        return None
    rows = np.arange(scenes.IMAGE_SIZE)[:, None]
    bottom = np.where(upper.core, rows, -1).max(axis=0)
    top = np.where(lower.core, rows, scenes.IMAGE_SIZE).min(axis=0)
    return int((top - bottom - 1)[columns].min())


def _apart(upper, lower):
    gap = vertical_gap(upper, lower)
    return gap is None or gap >= NO_CONTACT_GAP


def relation_verdict(relation, blobs):
    """Whether present blobs (first object first) stand in the spec's relation."""
    first, second = blobs[0], blobs[1]
    if relation == "between":
        ax = first.centre[0]
        sides = [b.centre[0] - ax for b in blobs[1:]]
        level = all(abs(b.centre[0] - ax) > abs(b.centre[1] - first.centre[1]) for b in blobs[1:])
        return level and min(abs(s) for s in sides) >= 2 and sides[0] * sides[1] < 0
    if relation == "on":
        gap = vertical_gap(first, second)
        return (gap is not None and CONTACT_GAP[0] <= gap <= CONTACT_GAP[1] and first.centre[1] < second.centre[1]
                and second.box[0] <= first.centre[0] <= second.box[2] + 1)
    if not scenes.relation_holds(relation, first.centre, second.centre):
        return False
    if relation == "above":
        return _apart(first, second)
    if relation == "below":
        return _apart(second, first)
    return True


def _object_facts(blobs, objects):
    present = all(b is not None and b.box is not None for b in blobs)
    return present, {"colour": present,
                     "shape": present and all(b.shape == o["shape"] for b, o in zip(blobs, objects)),
                     "texture": present and all(b.texture == o["texture"] for b, o in zip(blobs, objects))}


def _judge_single(analysis, spec):
    obj = spec["objects"][0]
    blob = analysis.blob(obj["colour"])
    present, facts = _object_facts([blob], [obj])
    facts["colour"] = present and all(blob.core.sum() >= other.core.sum()
                                      for other in analysis.objects_outside(blob.core) if other.colour != obj["colour"])
    return {**facts, "size": present and blob.size == obj["size"],
            "position": present and blob.position == obj["position"]}


def _judge_relation(analysis, spec):
    blobs = [analysis.blob(o["colour"]) for o in spec["objects"]]
    present, facts = _object_facts(blobs, spec["objects"])
    return {**facts, "relation": present and bool(relation_verdict(spec["relation"], blobs))}


def _shadow_visible(analysis, blob):
    expected = scenes.shadow_coverage(blob.centre[0], blob.box[3] + 1, blob.half_extent) >= 0.5
    visible = expected & ~ndimage.binary_dilation(blob.core, _EIGHT)
    return visible.sum() >= MIN_SHADOW_PIXELS and analysis.count("shadow", visible) >= SHADOW_VISIBLE * visible.sum()


def _judge_floor(analysis, obj):
    blob = analysis.blob(obj["colour"])
    present, facts = _object_facts([blob], [obj])
    band = np.s_[scenes.FLOOR_TOP:]
    floor = (analysis.count("floor", band) + analysis.count("shadow", band)
             >= FLOOR_PRESENT * analysis.names[band].size)
    standing = present and blob.box[3] >= scenes.FLOOR_TOP + FLOOR_STANDING_MARGIN
    return {**facts, "relation": bool(floor and standing),
            "implied": bool(standing and _shadow_visible(analysis, blob))}


def _judge_mirror(analysis, obj):
    above = [b for b in analysis.blobs(obj["colour"]) if b.box is not None and b.centre[1] < scenes.MIRROR_AXIS]
    below = [b for b in analysis.blobs(obj["colour"], reflection=True)
             if b.box is not None and b.centre[1] > scenes.MIRROR_AXIS]
    blob, reflection = next(iter(above), None), next(iter(below), None)
    present, facts = _object_facts([blob], [obj])
    near_mirror = np.linalg.norm(analysis.image[MIRROR_SEARCH].astype(np.float32) - np.array(scenes.MIRROR), axis=-1)
    line = int((near_mirror <= MIRROR_DISTANCE).sum(axis=1).max())
    implied = present and reflection is not None and (
        reflection.shape == obj["shape"] and reflection.brightness < blob.brightness
        and np.hypot(reflection.centre[0] - blob.centre[0],
                     reflection.centre[1] - (2 * scenes.MIRROR_AXIS - blob.centre[1])) <= MIRROR_TOLERANCE)
    return {**facts, "relation": present and line >= MIRROR_LINE_PIXELS and blob.box[3] < scenes.MIRROR_ROWS[0],
            "implied": bool(implied)}


def judge(image, spec):
    """Per-fact booleans for one HxWx3 image (uint8 or float in [0, 1]) and a spec, plus 'pass'."""
    if spec["kind"] == "single":
        facts = _judge_single(Analysis(image), spec)
    elif spec["kind"] == "relation":
        facts = _judge_relation(Analysis(image), spec)
    elif spec["kind"] == "implied":
        setting = spec["setting"]
        judge_setting = _judge_floor if setting == "floor" else _judge_mirror
        facts = judge_setting(Analysis(image, setting), spec["objects"][0])
    else:
        raise ValueError(f"unknown scene kind {spec['kind']!r}")
    facts = {fact: bool(value) for fact, value in facts.items()}
    facts["pass"] = all(facts.values())
    return facts


def judge_batch(images, specs):
    """``judge`` over a batch (BxHxWx3 array/tensor, or a list) and matching specs."""
    return [judge(image, spec) for image, spec in zip(images, specs)]


def main_object(image):
    """(colour, shape) of the largest object of one image (uint8 or float in [0, 1]), ``(None, None)`` if none
    (shape None when unclassifiable)."""
    blob = Analysis(image).largest_object()
    return (None, None) if blob is None else (blob.colour, blob.shape)
