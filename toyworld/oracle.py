"""Exact programmatic judge of toy-world images against specs (never uses a model).

Method: every pixel takes the nearest palette entry (each colour in full and reflection
shade, plus background and mirror grey) when it lies within ``MAX_COLOUR_DISTANCE``;
connected components (8-neighbourhood) of one colour name are objects, components under
``MIN_PIXELS`` are ignored, and the largest component of an asked colour is the object.
Its half-maximum core strips blur fringe; then shape comes from the core's bounding box (top/bottom fill
asymmetry: triangle, else fill ratio: square vs circle), size from the box extent, position
and relations from the box centre. The mirror line is any near-grey bright row near the middle.

Facts per kind (``pass`` = all of them):
  single   colour, shape, size, position (the asked object is also the largest object)
  relation colour, shape (both objects), relation (both present, right shapes, relation holds)
  mirror   colour, shape, relation (mirror line present, object on the named side),
           implied (a dimmer reflection of the same colour and shape at the mirrored place)
"""

import numpy as np

from . import scenes

MAX_COLOUR_DISTANCE = 70.0
MIN_PIXELS = 12
TRIANGLE_ASYMMETRY = 0.3
SQUARE_FILL = 0.88
LARGE_EXTENT = 12
CENTER_ZONE = 3.5
MIRROR_TOLERANCE = 3.0
MIRROR_LINE_PIXELS = 24
MIRROR_MAX_SPREAD = 40
MIRROR_MIN_BRIGHTNESS = 70

_ENTRIES = ([(name, rgb) for name, rgb in scenes.PALETTE.items()]
            + [(name, tuple(round(c * scenes.REFLECTION_SHADE) for c in rgb)) for name, rgb in scenes.PALETTE.items()]
            + [("background", scenes.BACKGROUND), ("grey", scenes.MIRROR_GREY)])
_ENTRY_NAMES = [name for name, _ in _ENTRIES]
_ENTRY_RGB = np.array([rgb for _, rgb in _ENTRIES], np.float32)


def to_uint8(image):
    """HxWx3 uint8, or float in [0, 1] (ComfyUI IMAGE), or a torch tensor -> uint8 numpy."""
    image = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return image


def colour_names(image):
    """HxW array of palette names ('' where no entry is close enough)."""
    pixels = image.astype(np.float32)[..., None, :]
    distances = np.linalg.norm(pixels - _ENTRY_RGB, axis=-1)
    nearest = distances.argmin(-1)
    names = np.array(_ENTRY_NAMES, dtype=object)[nearest]
    names[distances.min(-1) > MAX_COLOUR_DISTANCE] = ""
    return names


def _neighbourhood_max(array):
    """Maximum over each pixel's 3x3 neighbourhood (zero padding)."""
    height, width = array.shape
    padded = np.pad(array, 1)
    return np.max([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)


def half_max_core(mask, image, colour, unclaimed):
    """Pixels of the component, or next to it and ``unclaimed`` by any colour, at least half as strong
    as its peak along the background->colour axis: the half-maximum contour of a blurred shape
    follows the sharp shape's edge, also where blurred edge pixels fell outside the colour's
    palette radius."""
    background = np.array(scenes.BACKGROUND, np.float32)
    axis = np.array(scenes.PALETTE[colour], np.float32) - background
    strength = (image.astype(np.float32) - background) @ axis / (axis @ axis)
    peak = np.percentile(strength[mask], 90)
    return (mask | (_neighbourhood_max(mask) & unclaimed)) & (strength >= 0.5 * peak)


def components(mask):
    """Connected components (8-neighbourhood) of a boolean mask, largest first, as bool masks."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = np.where(mask, _neighbourhood_max(labels), 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    ids, counts = np.unique(labels[mask], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [labels == ids[k] for k in order if counts[k] >= MIN_PIXELS]


class Blob:
    """One detected object: pixel count and mean brightness of its component; bounding-box
    centre, extent and shape of its half-maximum core."""

    def __init__(self, mask, image, colour, unclaimed):
        self.pixels = int(mask.sum())
        self.brightness = float(image[mask].astype(np.float32).mean())
        core = half_max_core(mask, image, colour, unclaimed)
        if not core.any():
            self.centre, self.extent, self.shape = (-1.0, -1.0), 0, None
            return
        ys, xs = np.nonzero(core)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        self.centre = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
        self.extent = max(x1 - x0, y1 - y0) + 1
        self.shape = _classify_shape(core[y0:y1 + 1, x0:x1 + 1])

    @property
    def size(self):
        return "large" if self.extent >= LARGE_EXTENT else "small"

    @property
    def position(self):
        dx, dy = (c - (scenes.IMAGE_SIZE - 1) / 2.0 for c in self.centre)
        if max(abs(dx), abs(dy)) < CENTER_ZONE:
            return "center"
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


def _classify_shape(box):
    height, width = box.shape
    if min(height, width) < 3 or not 0.5 <= height / width <= 2.0:
        return None
    half = height // 2
    top, bottom = box[:half].mean(), box[height - half:].mean()
    if abs(top - bottom) > TRIANGLE_ASYMMETRY * max(top, bottom):
        return "triangle"
    return "square" if box.mean() >= SQUARE_FILL else "circle"


class _Analysis:
    """Components of every colour in one image and their blobs (computed on demand).
    Pixels in ``ignored_rows`` belong to no object; a blob's core may absorb neighbouring
    pixels that no other colour's component holds."""

    def __init__(self, image, ignored_rows=slice(0, 0)):
        self.image = image
        names = colour_names(image)
        names[ignored_rows] = ""
        self.masks = {c: components(names == c) for c in scenes.COLOURS}
        self.free = names != "grey"
        self.free[ignored_rows] = False
        self._blobs = {}

    def blobs(self, colour):
        if colour not in self._blobs:
            others = [m for c, masks in self.masks.items() if c != colour for m in masks]
            unclaimed = self.free & ~np.any(others, axis=0) if others else self.free
            self._blobs[colour] = [Blob(m, self.image, colour, unclaimed) for m in self.masks[colour]]
        return self._blobs[colour]

    def largest_object_pixels(self):
        return max((int(masks[0].sum()) for masks in self.masks.values() if masks), default=0)

    def mirror_line(self):
        """A row near MIRROR_ROW with many grey pixels (tolerates a blurred, dimmer line)."""
        rows = self.image[scenes.MIRROR_ROW - 2:scenes.MIRROR_ROW + 3].astype(np.float32)
        grey = (rows.max(-1) - rows.min(-1) < MIRROR_MAX_SPREAD) & (rows.mean(-1) > MIRROR_MIN_BRIGHTNESS)
        return bool(grey.sum(axis=1).max() >= MIRROR_LINE_PIXELS)


def _judge_single(analysis, spec):
    obj = spec["objects"][0]
    blob = next(iter(analysis.blobs(obj["colour"])), None)
    if blob is None:
        return {"colour": False, "shape": False, "size": False, "position": False}
    return {"colour": blob.pixels >= analysis.largest_object_pixels(),
            "shape": blob.shape == obj["shape"],
            "size": blob.size == obj["size"],
            "position": blob.position == obj["position"]}


def _judge_relation(analysis, spec):
    blobs = [next(iter(analysis.blobs(o["colour"])), None) for o in spec["objects"]]
    present = all(b is not None for b in blobs)
    shapes = present and all(b.shape == o["shape"] for b, o in zip(blobs, spec["objects"]))
    return {"colour": present, "shape": shapes,
            "relation": shapes and scenes.relation_holds(spec["relation"], blobs[0].centre, blobs[1].centre)}


def _judge_mirror(analysis, spec):
    obj = spec["objects"][0]
    above = spec["relation"] == "above"
    on_named_side = [b for b in analysis.blobs(obj["colour"]) if (b.centre[1] < scenes.MIRROR_ROW) == above]
    on_other_side = [b for b in analysis.blobs(obj["colour"]) if (b.centre[1] < scenes.MIRROR_ROW) != above]
    blob = next(iter(on_named_side), None)
    reflection = next(iter(on_other_side), None)
    implied = blob is not None and reflection is not None and (
        reflection.shape == obj["shape"]
        and reflection.brightness < blob.brightness
        and np.hypot(reflection.centre[0] - blob.centre[0],
                     reflection.centre[1] - (2 * scenes.MIRROR_ROW - blob.centre[1])) <= MIRROR_TOLERANCE)
    return {"colour": blob is not None,
            "shape": blob is not None and blob.shape == obj["shape"],
            "relation": blob is not None and analysis.mirror_line(),
            "implied": bool(implied)}


_JUDGES = {"single": _judge_single, "relation": _judge_relation, "mirror": _judge_mirror}


def judge(image, spec):
    """Per-fact booleans for one HxWx3 image (uint8 or float in [0, 1]) and a spec, plus 'pass'."""
    # blur can bridge an object and its reflection through the mirror line: cut the band out
    band = slice(scenes.MIRROR_ROW - 1, scenes.MIRROR_ROW + 2) if spec["kind"] == "mirror" else slice(0, 0)
    facts = {k: bool(v) for k, v in _JUDGES[spec["kind"]](_Analysis(to_uint8(image), band), spec).items()}
    facts["pass"] = all(facts.values())
    return facts


def judge_batch(images, specs):
    """``judge`` over a batch (BxHxWx3 array/tensor, or a list) and matching specs."""
    return [judge(image, spec) for image, spec in zip(images, specs)]
