"""Adaptive Guidance in ComfyUI: a GUIDER and a MODEL patch over samplers/adaptive_guidance.py.

Both forms are one mechanism, ``patch_uncond_skipping`` (shared with LinearAG):

* a ``sampler_calc_cond_batch_function`` on a clone of the model decides, per evaluation, which
  rows to evaluate: one batched [cond, uncond] call while no sample skips (exactly plain CFG),
  cond on the whole batch plus uncond on the sub-batch of samples that still need it otherwise.
  A function already in that slot (another pack's) is called for every evaluation instead of
  ``calc_cond_batch``.  Skipped samples get uncond := cond (or the technique's substitute), so
  the stock CFG combine and other packs' cfg/post-cfg functions still run unchanged;
* an OUTER_SAMPLE wrapper creates the technique's state at the start of every run and stores it
  in that run's own copy of ``model_options`` (nothing survives between runs);
* ``attach_run_stats`` counts model rows; each evaluation records ``baseline_rows`` (plain CFG's
  rows), the per-sample cosine (``None`` for samples not measured) and a mark per switch.

The GUIDER is ComfyUI's CFGGuider over the patched clone; the MODEL patch works with KSampler.
"""
import uuid

import torch

import comfy.samplers
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..samplers import adaptive_guidance as ag
from .guiders import cfg_guider, guider_inputs, model_input
from .run_stats import attach_run_stats, current_run, node_id_of

CATEGORY = "Guidance Kit/acceleration"
FAMILY_OF_MODEL_TYPE = {"EPS": "eps", "V_PREDICTION": "v", "V_PREDICTION_EDM": "v", "FLOW": "flow"}


def model_family(model) -> str:
    """"eps", "v", "flow", or the lower-case ComfyUI model type for other families."""
    name = model.model.model_type.name
    return FAMILY_OF_MODEL_TYPE.get(name, name.lower())


def _rows_of_cond(cond_list, rows, batch):
    """Copy of a processed cond list restricted to the samples ``rows`` (per-sample tensors indexed)."""
    if cond_list is None:
        return None
    out = []
    for entry in cond_list:
        entry = entry.copy()
        model_conds = {}
        for name, value in entry.get("model_conds", {}).items():
            tensor = getattr(value, "cond", None)
            per_sample = isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape[0] == batch > 1
            model_conds[name] = value._copy_with(tensor[rows.to(tensor.device)]) if per_sample else value
        entry["model_conds"] = model_conds
        mask = entry.get("mask")
        if isinstance(mask, torch.Tensor) and mask.shape[0] == batch > 1:
            entry["mask"] = mask[rows.to(mask.device)]
        out.append(entry)
    return out


class CondEvaluator:
    """Evaluates the conditional and/or unconditional of one ``sampling_function`` call, for all
    samples or a sub-batch, the way ComfyUI would (through a pre-existing calc-cond-batch function).

    The conds keep their positions ([cond, None] / [None, uncond]) so ``cond_or_uncond`` stays
    right for patches that look at it.  ControlNet hints cannot be sub-batched reliably, so an
    uncond carrying one is evaluated on the whole batch and indexed."""

    def __init__(self, args: dict, previous):
        self.args = args
        self.previous = previous
        self.cond, self.uncond = args["conds"][0], args["conds"][1]
        self.x = args["input"]
        self.batch = self.x.shape[0]
        self.sigma = float(args["sigma"].flatten()[0])

    def calc(self, conds, x, timestep):
        if self.previous is not None:
            return self.previous({**self.args, "conds": conds, "input": x, "sigma": timestep})
        return comfy.samplers.calc_cond_batch(self.args["model"], conds, x, timestep, self.args["model_options"])

    def __call__(self, with_cond: bool, with_uncond: bool, rows):
        conds = [self.cond if with_cond else None, self.uncond if with_uncond else None]
        if rows is None or any("control" in entry for entry in self.uncond):
            out = self.calc(conds, self.x, self.args["sigma"])
            return (out[0], out[1]) if rows is None else (out[0][rows], out[1][rows])
        timestep = self.args["sigma"]
        if timestep.ndim and timestep.shape[0] == self.batch:
            timestep = timestep[rows.to(timestep.device)]
        out = self.calc([_rows_of_cond(c, rows, self.batch) for c in conds], self.x[rows.to(self.x.device)], timestep)
        return out[0], out[1]

    @property
    def baseline_rows(self) -> int:
        return self.batch * (len(self.cond) + len(self.uncond))


def patch_uncond_skipping(model, technique: str, node_id, start_run, step):
    """Clone ``model`` and install the uncond-skipping patch described in the module docstring.

    ``start_run(guider, sigmas, sampler) -> state`` runs at the start of every sampling run;
    ``step(state, evaluator, run) -> (cond, uncond)`` handles one evaluation (``run`` is the
    RunStats or None).  Evaluations without an unconditional (cfg = 1) pass through untouched."""
    patched = model.clone()
    attach_run_stats(patched, technique, node_id)
    key = f"guidance_kit.{technique}.{uuid.uuid4().hex[:8]}"
    previous = patched.model_options.get("sampler_calc_cond_batch_function")

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        sampler = args[2] if len(args) > 2 else kwargs["sampler"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        guider.model_options.setdefault("transformer_options", {})[key] = start_run(guider, sigmas, sampler)
        return executor(*args, **kwargs)

    def calc_cond_batch(args):
        state = args["model_options"].get("transformer_options", {}).get(key)
        evaluator = CondEvaluator(args, previous)
        if state is None or evaluator.uncond is None:
            return evaluator.calc(args["conds"], evaluator.x, args["sigma"])
        run = current_run(args["model_options"])
        if run is not None and run.current is not None:
            run.current.baseline_rows = evaluator.baseline_rows
        cond, uncond = step(state, evaluator, run)
        return [cond, uncond]

    patched.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, key, outer_sample)
    return patched


class AdaptiveGuidanceRun:
    """Per-run state of Adaptive Guidance."""

    def __init__(self, guider, threshold, quantity, start_percent, end_percent):
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        self.switch = ag.SwitchState(threshold, model_sampling.percent_to_sigma(start_percent),
                                     model_sampling.percent_to_sigma(end_percent))
        self.quantity = quantity
        self.model_sampling = model_sampling
        self.cfg_scale = float(getattr(guider, "cfg", 1.0))

    def signal_scale(self, sigma: float) -> float:
        """a(σ) of the model's forward process x = a·x0 + b·ε."""
        s = torch.tensor([sigma])
        return float(self.model_sampling.noise_scaling(s, torch.zeros(1), torch.ones(1)))


def adaptive_guidance_step(state: AdaptiveGuidanceRun, evaluator: CondEvaluator, run):
    """One evaluation of AG: evaluate what is needed, measure γ on the measured samples, switch."""
    sigma = evaluator.sigma
    skip = state.switch.skipped(sigma, evaluator.batch)
    cond, uncond = ag.evaluate_skipping(evaluator, skip)
    signal_scale = state.signal_scale(sigma) if state.quantity == "noise" else 1.0
    gamma = ag.similarity(state.quantity, evaluator.x, cond, uncond, signal_scale=signal_scale,
                          cfg_scale=state.cfg_scale)
    measured = ~skip
    switched = state.switch.observe(sigma, gamma, measured)
    if run is not None:
        run.signal(cosine=[float(g) if m else None for g, m in zip(gamma.tolist(), measured.tolist())])
        for sample in switched:
            run.mark(f"sample {sample} switched to conditional only "
                     f"(cos {float(gamma[sample]):.4f} >= {state.switch.threshold})")
    return cond, uncond


def patch_adaptive_guidance(model, threshold, measure, start_percent, end_percent, node_id=None):
    """Clone ``model`` with Adaptive Guidance installed (see module docstring)."""
    ag.validate_threshold(threshold)
    ag.validate_window(start_percent, end_percent)
    quantity = ag.default_quantity(model_family(model)) if measure == "auto" else measure
    if quantity not in ag.QUANTITIES:
        raise ValueError(f"Adaptive Guidance: measure must be 'auto' or one of {ag.QUANTITIES}, got {measure!r}")

    def start_run(guider, sigmas, sampler):
        return AdaptiveGuidanceRun(guider, threshold, quantity, start_percent, end_percent)

    return patch_uncond_skipping(model, "AG", node_id, start_run, adaptive_guidance_step)


def _options_inputs():
    return [
        io.Float.Input("threshold", default=0.99, min=0.0, max=1.0, step=0.001, round=0.0001,
                       tooltip="γ̄: a sample drops its unconditional once the cosine between its conditional and "
                               "unconditional predictions reaches this. 1.0 = never (plain CFG)."),
        io.Combo.Input("measure", options=["auto", *ag.QUANTITIES], default="auto",
                       tooltip="What the cosine is taken on: noise (ε), denoised (x0), or guidance (x0 with vs "
                               "without the guidance difference at this CFG scale). auto = the measured default "
                               "for the model family."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Earliest point of the schedule where a sample may switch to conditional only."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Latest point of the schedule where a switch may begin; samples that have not "
                               "switched by then keep CFG."),
    ]


class AdaptiveGuidanceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitAdaptiveGuidanceGuider",
            display_name="Adaptive Guidance Guider (Guidance Kit)",
            category=CATEGORY,
            description="CFG that stops evaluating the unconditional, sample by sample, once it agrees with "
                        "the conditional (Adaptive Guidance, arXiv 2312.12487). For SamplerCustomAdvanced.",
            inputs=[*guider_inputs(cfg_tooltip="Classifier-free guidance scale while guidance is on."),
                    *_options_inputs()],
            outputs=[io.Guider.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, threshold, measure, start_percent, end_percent) -> io.NodeOutput:
        patched = patch_adaptive_guidance(model, threshold, measure, start_percent, end_percent, node_id_of(cls))
        return io.NodeOutput(cfg_guider(patched, positive, negative, cfg))


class AdaptiveGuidanceModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitAdaptiveGuidance",
            display_name="Adaptive Guidance (Guidance Kit)",
            category=CATEGORY,
            description="MODEL patch for KSampler and any CFG guider: stops evaluating the unconditional, sample "
                        "by sample, once it agrees with the conditional (Adaptive Guidance, arXiv 2312.12487).",
            inputs=[model_input(), *_options_inputs()],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, threshold, measure, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(patch_adaptive_guidance(model, threshold, measure, start_percent, end_percent,
                                                     node_id_of(cls)))


NODES = [AdaptiveGuidanceGuider, AdaptiveGuidanceModelPatch]
