"""Adaptive Guidance in ComfyUI: a GUIDER and a MODEL patch over samplers/adaptive_guidance.py.

Installed through the technique contract (``contract.install``): per evaluation, cond on the whole
batch and uncond only on the samples that have not switched (``CondEvaluator.skipping``); the run
record gets the per-sample cosine (None where not measured) and a mark per switch.
"""
import torch

from comfy_api.latest import io

from ..samplers import adaptive_guidance as ag
from .contract import (
    Technique,
    TwinSpec,
    check_number,
    guider_and_patch,
    guider_inputs,
    install,
    record_switches,
    sampler_cfg,
)

CATEGORY = "Guidance Kit/acceleration"
FAMILY_OF_MODEL_TYPE = {"EPS": "eps", "V_PREDICTION": "v", "V_PREDICTION_EDM": "v", "FLOW": "flow"}
NODE = "Adaptive Guidance"


def model_family(model) -> str:
    """"eps", "v", "flow", or the lower-case ComfyUI model type for other families."""
    name = model.model.model_type.name
    return FAMILY_OF_MODEL_TYPE.get(name, name.lower())


class AdaptiveGuidanceRun:
    """Per-run state of Adaptive Guidance."""

    def __init__(self, guider, threshold, quantity, start_percent, end_percent):
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        self.switch = ag.SwitchState(threshold, model_sampling.percent_to_sigma(start_percent),
                                     model_sampling.percent_to_sigma(end_percent))
        self.quantity = quantity
        self.model_sampling = model_sampling
        self.cfg_scale = sampler_cfg(guider)

    def signal_scale(self, sigma: float) -> float:
        """a(σ) of the model's forward process x = a·x0 + b·ε."""
        s = torch.tensor([sigma])
        return float(self.model_sampling.noise_scaling(s, torch.zeros(1), torch.ones(1)))


class AdaptiveGuidance(Technique):
    name = "AG"
    node = NODE
    uses_slot = True

    def __init__(self, threshold, quantity, start_percent, end_percent):
        self.options = (threshold, quantity, start_percent, end_percent)

    def start_run(self, guider, sigmas, sampler):
        return AdaptiveGuidanceRun(guider, *self.options)

    def evaluate(self, state: AdaptiveGuidanceRun, evaluator, run):
        sigma = evaluator.sigma
        skip = state.switch.skipped(sigma, evaluator.batch)
        cond, uncond = evaluator.skipping(skip)
        signal_scale = state.signal_scale(sigma) if state.quantity == "noise" else 1.0
        gamma = ag.similarity(state.quantity, evaluator.x, cond, uncond, signal_scale=signal_scale,
                              cfg_scale=state.cfg_scale)
        measured = ~skip
        record_switches(run, state.switch.observe(sigma, gamma, measured), gamma, measured, "cosine",
                        lambda cos: f"cos {cos:.4f} >= {state.switch.threshold}")
        return [cond, uncond]


def patch_adaptive_guidance(model, node_id=None, *, threshold, measure, start_percent, end_percent):
    """Clone ``model`` with Adaptive Guidance installed."""
    check_number(NODE, "threshold", threshold, 0.0, 1.0)
    check_number(NODE, "start_percent", start_percent, 0.0, 1.0)
    check_number(NODE, "end_percent", end_percent, 0.0, 1.0)
    if start_percent > end_percent:
        raise ValueError(f"{NODE}: need 'start_percent' <= 'end_percent', got {start_percent} > {end_percent}")
    quantity = ag.default_quantity(model_family(model)) if measure == "auto" else measure
    if quantity not in ag.QUANTITIES:
        raise ValueError(f"{NODE}: 'measure' must be 'auto' or one of {ag.QUANTITIES}, got {measure!r}")
    return install(model, AdaptiveGuidance(threshold, quantity, start_percent, end_percent), node_id)


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


AdaptiveGuidanceGuider, AdaptiveGuidanceModelPatch = guider_and_patch(TwinSpec(
    name="AdaptiveGuidance", category=CATEGORY, options=_options_inputs, patch=patch_adaptive_guidance,
    guider_id="GuidanceKitAdaptiveGuidanceGuider", guider_display="Adaptive Guidance Guider (Guidance Kit)",
    guider_description="CFG that stops evaluating the unconditional, sample by sample, once it agrees with the "
                       "conditional (Adaptive Guidance, arXiv 2312.12487). For SamplerCustomAdvanced.",
    guider_inputs=lambda: guider_inputs(cfg_tooltip="Classifier-free guidance scale while guidance is on."),
    patch_id="GuidanceKitAdaptiveGuidance", patch_display="Adaptive Guidance (Guidance Kit)",
    patch_description="MODEL patch for KSampler and any CFG guider: stops evaluating the unconditional, sample by "
                      "sample, once it agrees with the conditional (Adaptive Guidance, arXiv 2312.12487).",
))

NODES = [AdaptiveGuidanceGuider, AdaptiveGuidanceModelPatch]
