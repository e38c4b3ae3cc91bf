"""Input checks every node shares: numbers against their widgets, and what a sampling run needs (errors name
the node and the input, before compute)."""
import math

import torch

from .host import sampler_cfg


def check_number(where: str, name: str, value: float, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False) -> float:
    """``value`` as a float, or a ValueError naming the node and input when it is NaN/inf or outside
    [low, high] ((low, high] with ``low_open``).  Whole numbers are compared exactly (a seed of 2**64 - 1 is
    inside [0, 2**64 - 1]; as floats both would round to 2**64)."""
    exact = value if isinstance(value, int) and not isinstance(value, bool) else float(value)
    inside = math.isfinite(exact) and (low < exact if low_open else low <= exact) and exact <= high
    if not inside:
        bounds = f"{'(' if low_open else '['}{_bound(low)}, {_bound(high)}]"
        raise ValueError(f"{where}: '{name}' must be a finite number in {bounds}, got {exact}")
    return float(exact)


def _bound(limit: float) -> str:
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def check_numeric_inputs(node_cls, where: str, values: dict) -> None:
    """Every INT/FLOAT input of ``node_cls``'s schema found in ``values``: finite, inside its widget's range,
    and whole for INT (``check_number``'s error names the node and the input)."""
    for spec in node_cls.define_schema().inputs:
        kind = spec.get_io_type()
        if kind not in ("INT", "FLOAT") or spec.id not in values:
            continue
        low = -math.inf if spec.min is None else spec.min
        high = math.inf if spec.max is None else spec.max
        value = check_number(where, spec.id, values[spec.id], low, high)
        if kind == "INT" and not value.is_integer():
            raise ValueError(f"{where}: '{spec.id}' must be a whole number, got {values[spec.id]}")


def check_sampling_inputs(where: str, guider, latent_image: torch.Tensor) -> None:
    """What a sampling run needs and ComfyUI would turn into a wrong image or a raw error deep in sampling:
    a finite cfg and latent, a non-empty positive, a non-empty negative when CFG uses it, and masks whose
    batch fits the latent's (ComfyUI repeats a mask of batch m over a latent batch b only when m divides b)."""
    cfg = sampler_cfg(guider)
    if not math.isfinite(cfg):
        raise ValueError(f"{where}: the sampler's 'cfg' is {cfg}; give a finite guidance scale")
    if not bool(torch.isfinite(latent_image).all()):
        raise ValueError(f"{where}: the sampler's 'latent_image' holds NaN or inf values")
    conds = getattr(guider, "conds", {})
    needed = ["positive"] + (["negative"] if cfg != 1.0 else [])
    empty = [name for name in needed if name in conds and not conds[name]]
    if empty:
        raise ValueError(f"{where}: the '{empty[0]}' conditioning is empty (no entries)")
    batch = latent_image.shape[0]
    for name, entries in conds.items():
        for entry in entries or ():
            mask = entry.get("mask")
            if isinstance(mask, torch.Tensor) and mask.ndim == 3 and mask.shape[0] < batch and batch % mask.shape[0]:
                raise ValueError(f"{where}: the '{name}' conditioning's mask has a batch of {mask.shape[0]}, which "
                                 f"does not divide the latent batch of {batch}; give one mask or one per image")
