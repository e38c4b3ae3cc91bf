"""The technique protocol and ``install``: how every Guidance Kit technique installs itself on a MODEL.

``install(model, technique, node_id)`` returns a clone of ``model`` (the input is never modified) carrying:

* run statistics (``stats.attach_run_stats``): rows per evaluation, the baseline rows of plain CFG, the
  technique's signals and decisions, which techniques acted, published after every run;
* an OUTER_SAMPLE wrapper that checks the sampling inputs, calls ``technique.start_run(guider, sigmas, sampler)``
  at the start of every sampling run and keeps the returned state in that run's own copy of ``model_options``
  (nothing survives a run); hooks in other slots read it with ``run_state(options, key)``;
* if the technique overrides ``evaluate``: ComfyUI's ``sampler_calc_cond_batch_function`` slot.  A function
  already there (another pack's, or an earlier Guidance Kit patch) is chained: every evaluation reaches it as
  ComfyUI's own ``[cond, uncond]`` / ``[cond, None]`` pair (``CondEvaluator``).  A guider or a later patch that
  bypasses the slot, or one above that never evaluates the unconditional a technique needs, is an error naming
  both, never a silent drop;
* whatever ``technique.patch(patched, key)`` adds (block replacements, post-CFG functions: plain functions or
  closures, never bound methods, since every clone deep-copies ``model_options``).

Installing a technique over an earlier installation of the same class replaces it (a slot technique on top
of the slot; another when its ``unpatch`` removes its hooks), or combines with it (``Technique.stacked_on``).
docs/contract.md explains the design, including why the slot and not the keyed CALC_COND_BATCH wrapper chain.
"""
import types
import uuid
from dataclasses import dataclass

import torch

from comfy.patcher_extension import WrappersMP

from .checks import check_sampling_inputs
from .evaluator import CondEvaluator
from .host import sampler_cfg
from .stats import attach_run_stats, current_run

SLOT = "sampler_calc_cond_batch_function"
INSTALLATIONS = "guidance_kit.installations"  # attachment: technique class -> (technique, key) of its last install


class Technique:
    """What a technique supplies to ``install`` (override what it uses)."""

    name = "CFG"        # label of its run summaries ("AG: 20 steps, ...")
    node = "Guidance Kit"  # display name of its node, for error messages
    needs_uncond = True  # evaluations without an unconditional (cfg 1) pass through untouched
    uses_slot = False    # True: ``evaluate`` takes ComfyUI's calc-cond-batch slot

    def start_run(self, guider, sigmas: torch.Tensor, sampler):
        """Fresh per-run state, created when a sampling run starts."""
        return None

    def evaluate(self, state, evaluator: "CondEvaluator", run) -> list:
        """One evaluation in the calc-cond-batch slot (``uses_slot``): return ``[cond, uncond]`` predictions."""
        raise NotImplementedError

    def patch(self, patched, key: str) -> None:
        """Install anything else on the clone (``key`` is unique to this installation)."""

    def stacked_on(self, earlier: "Technique") -> "Technique":
        """What acts when this technique is installed over an ``earlier`` installation of the same class:
        by default this one replaces it; a technique whose parts combine returns the combination."""
        return self

    def unpatch(self, patched, key: str) -> bool:
        """Remove what ``patch`` installed under ``key`` so a later installation replaces this one (True), or
        leave it (False: both act, e.g. two PPAP targets).  Slot techniques are unchained by the contract."""
        return False


@dataclass
class _RunSlot:
    state: object
    cfg: float = 1.0
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


def installed(model, technique_type: type[Technique]) -> Technique | None:
    """The ``technique_type`` technique that ``install`` last put on ``model`` or on a model it was cloned from."""
    return (model.get_attachment(INSTALLATIONS) or {}).get(technique_type, (None, None))[0]


def install(model, technique: Technique, node_id: str | None = None):
    """A clone of ``model`` with ``technique`` installed as described in the module docstring."""
    patched = model.clone()
    uses_slot = technique.uses_slot
    previous = patched.model_options.get(SLOT)
    earlier = patched.get_attachment(INSTALLATIONS) or {}
    earlier_technique, earlier_key = earlier.get(type(technique), (None, None))
    on_top = previous is not None and getattr(previous, "key", None) == earlier_key
    if earlier_key is not None and ((uses_slot and on_top) or (not uses_slot and
                                                               earlier_technique.unpatch(patched, earlier_key))):
        # the same technique again replaces the earlier installation, or combines with it (``stacked_on``);
        # what the earlier one chained stays chained
        technique = technique.stacked_on(earlier_technique)
        for wrapper_type in (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE):
            patched.remove_wrappers_with_key(wrapper_type, earlier_key)
        patched.remove_additional_models(earlier_key)
        if uses_slot:
            previous = previous.previous
    attach_run_stats(patched, technique.name, node_id)
    key = f"guidance_kit.{technique.name}.{uuid.uuid4().hex[:8]}"
    patched.set_attachments(INSTALLATIONS, {**earlier, type(technique): (technique, key)})  # a new dict per clone

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        sampler = args[2] if len(args) > 2 else kwargs["sampler"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        latent_image = args[1] if len(args) > 1 else kwargs["latent_image"]
        check_sampling_inputs(technique.node, guider, latent_image)
        slot = _RunSlot(technique.start_run(guider, sigmas, sampler), sampler_cfg(guider))
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
            if slot.reached == 1 and slot.cfg != 1.0:  # guided sampling, yet no unconditional from the start
                top = args["model_options"].get(SLOT)
                above = getattr(getattr(top, "technique", None), "node", None) or _slot_name(top)
                raise RuntimeError(f"{technique.node}: '{above}' above it evaluates no unconditional, so "
                                   f"{technique.name} cannot act; apply {technique.node} after {above}, or remove one")
            return evaluator.passthrough()
        run = current_run(args["model_options"])
        if run is not None and run.current is not None:
            run.current.baseline_rows = evaluator.baseline_rows
            run.act(technique.name)
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


def run_state(options: dict, key: str):
    """The state ``start_run`` returned for the installation ``key`` in the current sampling run, read from a
    hook's ``model_options`` or ``transformer_options``; None outside such a run."""
    slot = options.get("transformer_options", options).get(key)
    return slot.state if slot is not None else None
