"""The technique contract: how every Guidance Kit technique installs itself on a MODEL.

A technique is a ``Technique`` subclass; ``install(model, technique, node_id)`` returns a clone of
``model`` (the input is never modified) carrying:

* run statistics (``stats_wrappers.attach_run_stats``): rows per evaluation, the baseline rows of
  plain CFG, the technique's signals and decisions, published after every run;
* an OUTER_SAMPLE wrapper that calls ``technique.start_run(guider, sigmas, sampler)`` at the start
  of every sampling run and keeps the returned state in that run's own copy of ``model_options``
  (nothing survives a run, so runs of different lengths, batches or samplers never interfere);
* if the technique overrides ``evaluate``: ComfyUI's ``sampler_calc_cond_batch_function`` slot.
  A function already there (another pack's, or an earlier Guidance Kit patch) is chained: every
  evaluation reaches it as ComfyUI's own ``[cond, uncond]`` / ``[cond, None]`` pair
  (``CondEvaluator``), so it keeps working whatever the technique asks for.  A guider or a later
  patch that bypasses the slot is reported as an error naming it, never silently ignored;
* whatever ``technique.patch(patched, key)`` adds (block replacements, post-CFG functions).

``guider_and_patch`` builds a technique's GUIDER node and its MODEL-patch twin from one list of
inputs; both run the same patched clone (the GUIDER is ComfyUI's CFGGuider over it).
"""
import hashlib
import math
import types
import uuid
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.samplers
import comfy.utils
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from .guiders import cfg_guider, guider_inputs, model_input
from .stats_wrappers import attach_run_stats, current_run, node_id_of

SLOT = "sampler_calc_cond_batch_function"


class Technique:
    """What a technique supplies to ``install`` (override what it uses)."""

    name = "CFG"        # label of its run summaries ("AG: 20 steps, ...")
    node = "Guidance Kit"  # display name of its node, for error messages
    needs_uncond = True  # evaluations without an unconditional (cfg 1) pass through untouched

    def start_run(self, guider, sigmas: torch.Tensor, sampler):
        """Fresh per-run state, created when a sampling run starts."""
        return None

    def evaluate(self, state, evaluator: "CondEvaluator", run) -> list:
        """One evaluation in the calc-cond-batch slot: return ``[cond, uncond]`` predictions."""
        raise NotImplementedError

    def patch(self, patched, key: str) -> None:
        """Install anything else on the clone (``key`` is unique to this installation)."""


def evaluates(technique: Technique) -> bool:
    return type(technique).evaluate is not Technique.evaluate


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

    def _sub(self, rows):
        """(x, timestep, cond-list restrictor) for a sub-batch (``rows`` None: the whole batch)."""
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
        x, timestep, restrict = self._sub(rows)
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


@dataclass
class _RunSlot:
    state: object
    reached: int = 0


def _slot_name(function) -> str:
    name = getattr(function, "__qualname__", type(function).__qualname__)
    return name.split(".<locals>")[0].removesuffix(".execute")


def _chains(function, key: str) -> bool:
    """Whether ``function`` is, or chains to, the slot function installed under ``key``."""
    while function is not None:
        if getattr(function, "key", None) == key:
            return True
        function = getattr(function, "previous", None)
    return False


def install(model, technique: Technique, node_id: str | None = None):
    """A clone of ``model`` with ``technique`` installed as described in the module docstring."""
    patched = model.clone()
    attach_run_stats(patched, technique.name, node_id)
    key = f"guidance_kit.{technique.name}.{uuid.uuid4().hex[:8]}"
    uses_slot = evaluates(technique)
    previous = patched.model_options.get(SLOT)
    if uses_slot and isinstance(getattr(previous, "technique", None), type(technique)):
        # the same technique again replaces the earlier installation (what it chained stays chained)
        for wrapper_type in (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE):
            patched.remove_wrappers_with_key(wrapper_type, previous.key)
        previous = previous.previous

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        sampler = args[2] if len(args) > 2 else kwargs["sampler"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        latent_image = args[1] if len(args) > 1 else kwargs["latent_image"]
        check_sampling_inputs(technique.node, guider, latent_image)
        slot = _RunSlot(technique.start_run(guider, sigmas, sampler))
        guider.model_options.setdefault("transformer_options", {})[key] = slot
        return executor(*args, **kwargs)

    def predict_noise(executor, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI signature)
        slot = model_options.get("transformer_options", {}).get(key)
        reached = slot.reached if slot is not None else 0
        out = executor(x, timestep, model_options, seed)
        if slot is not None and slot.reached == reached:
            now = model_options.get(SLOT)
            guider = type(executor.class_obj).__name__
            culprit = f"the guider '{guider}' evaluates the model without ComfyUI's calc-cond-batch function" \
                if _chains(now, key) else f"'{_slot_name(now)}' replaced its calc-cond-batch function after it"
            raise RuntimeError(f"{technique.node}: {culprit}, so {technique.name} cannot act; apply "
                               f"{technique.node} last, with KSampler, CFGGuider or a Guidance Kit guider")
        return out

    def calc_cond_batch(args):
        slot = args["model_options"].get("transformer_options", {}).get(key)
        evaluator = CondEvaluator(args, previous)
        if slot is None:
            return evaluator.passthrough()
        slot.reached += 1
        if technique.needs_uncond and evaluator.uncond is None:
            return evaluator.passthrough()
        run = current_run(args["model_options"])
        if run is not None and run.current is not None:
            run.current.baseline_rows = evaluator.baseline_rows
        return technique.evaluate(slot.state, evaluator, run)

    calc_cond_batch.technique, calc_cond_batch.key, calc_cond_batch.previous = technique, key, previous
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, key, outer_sample)
    if uses_slot:
        patched.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
        patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, key, predict_noise)
    technique.patch(patched, key)
    check_clone_safe(patched.model_options, technique.node)
    return patched


def check_clone_safe(options, where: str) -> None:
    """``ModelPatcher.clone`` deep-copies ``model_options``, and a deep copy of a bound method copies the object
    it is bound to (a technique's weights become inference tensors when a later node clones the model inside
    ComfyUI's ``torch.inference_mode``).  Hooks must be plain functions or closures, which are shared."""
    if isinstance(options, dict):
        values = options.values()
    elif isinstance(options, (list, tuple)):
        values = options
    else:
        if isinstance(options, types.MethodType):
            raise TypeError(f"{where}: the hook {options.__qualname__} is a bound method; every clone of the model "
                            f"would deep-copy its object. Install a closure instead")
        return
    for value in values:
        check_clone_safe(value, where)


def check_sampling_inputs(where: str, guider, latent_image: torch.Tensor) -> None:
    """What a sampling run needs and ComfyUI would turn into a wrong image without an error: a
    finite latent, a non-empty positive, and a non-empty negative when CFG uses it."""
    if not bool(torch.isfinite(latent_image).all()):
        raise ValueError(f"{where}: the sampler's 'latent_image' holds NaN or inf values")
    conds = getattr(guider, "conds", {})
    needed = ["positive"] + (["negative"] if getattr(guider, "cfg", 1.0) != 1.0 else [])
    empty = [name for name in needed if name in conds and not conds[name]]
    if empty:
        raise ValueError(f"{where}: the '{empty[0]}' conditioning is empty (no entries)")


def model_identity(model) -> str:
    """Model class + SHA-256 of the first and last two weight tensors of the diffusion model (the
    identity calibrations and trained heads are checked against; weight patches are not part of it)."""
    state = model.model.diffusion_model.state_dict()
    names = sorted(state)
    digest = hashlib.sha256(type(model.model).__name__.encode())
    for name in names[:2] + names[-2:]:
        tensor = state[name].detach().float().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten()[:65536].numpy().tobytes())
    return f"{type(model.model).__name__}:{digest.hexdigest()[:16]}"


# ---------------------------------------------------------------- input checks

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


# ---------------------------------------------------------------- GUIDER + MODEL-patch twins

@dataclass
class TwinSpec:
    """One technique's two nodes: ``patch(model, node_id, **options)`` returns the patched clone."""

    name: str                 # class-name stem: <name>Guider, <name>ModelPatch
    guider_id: str
    guider_display: str
    patch_id: str
    patch_display: str
    category: str
    guider_description: str
    patch_description: str
    options: Callable[[], list]
    patch: Callable
    guider_inputs: Callable[[], list] = guider_inputs  # model, positive, negative, cfg (in this order)
    model_tooltip: str | None = None
    check_guider: Callable | None = None  # (positive, negative, **options) -> None, raises ValueError


def guider_and_patch(spec: TwinSpec) -> tuple[type[io.ComfyNode], type[io.ComfyNode]]:
    """(GUIDER node, MODEL-patch node) of a technique, from one list of inputs."""
    where = spec.guider_display.removesuffix(" (Guidance Kit)")

    class Guider(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=spec.guider_id, display_name=spec.guider_display, category=spec.category,
                             description=spec.guider_description, inputs=[*spec.guider_inputs(), *spec.options()],
                             outputs=[io.Guider.Output()], hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, *args, **inputs) -> io.NodeOutput:
            inputs |= dict(zip([i.id for i in (*spec.guider_inputs(), *spec.options())], args))
            model, positive, negative, cfg = (inputs.pop(i.id) for i in spec.guider_inputs())
            check_number(where, "cfg", cfg, 0.0, 100.0)
            if spec.check_guider is not None:
                spec.check_guider(positive, negative, **inputs)
            return io.NodeOutput(cfg_guider(spec.patch(model, node_id_of(cls), **inputs), positive, negative, cfg))

    class ModelPatch(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=spec.patch_id, display_name=spec.patch_display, category=spec.category,
                             description=spec.patch_description,
                             inputs=[model_input(spec.model_tooltip), *spec.options()],
                             outputs=[io.Model.Output()], hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, model, *args, **options) -> io.NodeOutput:
            options |= dict(zip([i.id for i in spec.options()], args))
            return io.NodeOutput(spec.patch(model, node_id_of(cls), **options))

    for node, suffix in ((Guider, "Guider"), (ModelPatch, "ModelPatch")):
        node.__name__ = node.__qualname__ = f"{spec.name}{suffix}"
    return Guider, ModelPatch
