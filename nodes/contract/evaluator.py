"""How a technique evaluates cond lists inside ComfyUI's calc-cond-batch slot, on all samples or a sub-batch,
exactly as ComfyUI would (``CondEvaluator``), and the per-sample broadcasting it needs."""
from typing import Callable

import torch

import comfy.samplers
import comfy.utils


def broadcast_to_batch(tensor: torch.Tensor, batch: int, mask: bool = False) -> torch.Tensor:
    """A per-sample tensor expanded to the latent batch exactly as ComfyUI does when sampling
    (``get_area_and_mult`` for masks, ``repeat_to_batch_size`` for model conds)."""
    if tensor.shape[0] == batch:
        return tensor
    if mask:
        tensor = tensor[:batch]
        return tensor.repeat((batch // tensor.shape[0],) + (1,) * (tensor.ndim - 1))
    return comfy.utils.repeat_to_batch_size(tensor, batch)


def rows_of_cond(cond_list, rows: torch.Tensor, batch: int):
    """A processed cond list restricted to the samples ``rows`` of a ``batch`` (per-sample model
    conds and masks are first broadcast to the batch, as ComfyUI would)."""
    if cond_list is None:
        return None
    out = []
    for entry in cond_list:
        entry = entry.copy()
        model_conds = {}
        for name, value in entry.get("model_conds", {}).items():
            tensor = getattr(value, "cond", None)
            if isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape[0] > 1 and batch > 1:
                value = value._copy_with(broadcast_to_batch(tensor, batch)[rows.to(tensor.device)])
            model_conds[name] = value
        entry["model_conds"] = model_conds
        mask = entry.get("mask")
        if isinstance(mask, torch.Tensor) and batch > 1:
            entry["mask"] = broadcast_to_batch(mask, batch, mask=True)[rows.to(mask.device)]
        out.append(entry)
    return out


class CondEvaluator:
    """Evaluates cond lists for one ``sampling_function`` call, on all samples or a sub-batch, the way
    ComfyUI would: through the function that was in the slot before (``previous``) with ComfyUI's
    two lists, else through ``comfy.samplers.calc_cond_batch`` (whose CALC_COND_BATCH wrappers run).

    ``cond``/``uncond`` are the processed lists ComfyUI passed; ``uncond`` is None at cfg 1."""

    def __init__(self, args: dict, previous: Callable | None):
        self.args = args
        self.previous = previous
        self.cond, self.uncond = args["conds"]
        self.x = args["input"]
        self.batch = self.x.shape[0]
        self.sigma = float(args["sigma"].flatten()[0])

    def sub_batch(self, rows):
        """(x, timestep, cond-list restrictor) for the samples ``rows`` (None: the whole batch)."""
        timestep = self.args["sigma"]
        if rows is None:
            return self.x, timestep, lambda c: c
        if timestep.ndim and timestep.shape[0] == self.batch:
            timestep = timestep[rows.to(timestep.device)]
        return self.x[rows.to(self.x.device)], timestep, lambda c: rows_of_cond(c, rows, self.batch)

    def _call(self, lists: list, x, timestep) -> list:
        if self.previous is not None:
            return list(self.previous({**self.args, "conds": lists, "input": x, "sigma": timestep}))
        return comfy.samplers.calc_cond_batch(self.args["model"], lists, x, timestep, self.args["model_options"])

    def evaluate_lists(self, lists: list, rows: torch.Tensor | None = None) -> list:
        """Predictions of any cond lists (the last one the unconditional; None entries are not
        evaluated and come back None).  Without a previous function: one batched call.  With one:
        ComfyUI's own pairs, [first cond, uncond] then [cond, None] for each other cond (an
        unconditional asked for alone is paired with the sampler's conditional)."""
        x, timestep, restrict = self.sub_batch(rows)
        lists = [restrict(c) for c in lists]
        if self.previous is None:
            out = self._call(lists, x, timestep)
        else:
            *conds, uncond = lists
            present = [k for k, c in enumerate(conds) if c is not None]
            out = [None] * len(lists)
            if present or uncond is not None:
                pair = conds[present[0]] if present else restrict(self.cond)
                first, out[-1] = self._call([pair, uncond], x, timestep)
                if present:
                    out[present[0]] = first
            for k in present[1:]:
                out[k] = self._call([conds[k], None], x, timestep)[0]
        return [None if c is None else o for c, o in zip(lists, out)]

    def __call__(self, with_cond: bool, with_uncond: bool, rows: torch.Tensor | None = None):
        """(cond, uncond) of the samples ``rows`` (None: all); an entry not asked for is None."""
        return tuple(self.evaluate_lists([self.cond if with_cond else None, self.uncond if with_uncond else None],
                                         rows))

    def skipping(self, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional for every sample, unconditional only where ``skip`` (bool [B]) is False; the
        skipped samples' unconditional is a copy of their conditional (the CFG combine then gives
        the conditional there).  One [cond, uncond] call while no sample skips (plain CFG)."""
        if not skip.any():
            return self(True, True)
        if skip.all():
            cond, _ = self(True, False)
            return cond, cond.clone()
        keep = (~skip).nonzero().flatten()
        if self.previous is None:
            cond, _ = self(True, False)
            uncond = cond.clone()
            if keep.numel():
                uncond[keep.to(cond.device)] = self(False, True, keep)[1]
            return cond, uncond
        skipped = skip.nonzero().flatten()
        cond_skipped, _ = self(True, False, skipped)
        cond = torch.empty((self.batch, *cond_skipped.shape[1:]), dtype=cond_skipped.dtype, device=cond_skipped.device)
        cond[skipped.to(cond.device)] = cond_skipped
        uncond = cond.clone()
        if keep.numel():
            index = keep.to(cond.device)
            cond[index], uncond[index] = self(True, True, keep)
        return cond, uncond

    def passthrough(self) -> list:
        return self._call(self.args["conds"], self.x, self.args["sigma"])

    @property
    def baseline_rows(self) -> int:
        """Rows plain CFG would evaluate here (one per entry of each list, per sample)."""
        return self.batch * sum(len(c) for c in (self.cond, self.uncond) if c is not None)
