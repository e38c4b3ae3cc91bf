"""Composable Diffusion in ComfyUI: AND / NOT of weighted concepts (math in samplers/composable.py).

A composition travels inside a CONDITIONING: each entry of a concept carries ``guidance_kit_concept``
(an id shared by the concept's entries) and ``guidance_kit_concept_weight`` (its signed weight);
unmarked entries form one concept of weight 1, so plain conditioning is plain CFG.  The sampler's
cfg multiplies every weight (A1111's ``AND``)::

    denoised = uncond + cfg * sum_i w_i * (cond_i - uncond)

Installed through the technique contract: [positive, negative] becomes [concept_1 … concept_n,
negative], evaluated by ``CondEvaluator.evaluate_lists`` (one batched ``calc_cond_batch`` call, or
ComfyUI's own pairs through a chained function); each concept keeps its area, mask, timestep range
and ControlNet, and predicts the unconditional where it does not apply.  The composed prediction is
returned as CFG's (cond, uncond) pair, so cfg/pre-/post-CFG functions still run.  Per-concept
Adaptive Guidance (``threshold`` < 1): a concept's rows are skipped once every sample has converged
for it; each sample drops the concept's term as soon as it has converged.
"""
import math
import uuid

import torch

import comfy.sampler_helpers
import comfy.samplers
from comfy_api.latest import io

from ..samplers.composable import (
    MAX_CONCEPTS,
    MAX_WEIGHT,
    ConvergenceTracker,
    check_weights,
    combine_step,
    concept_cosine,
    lead_concept,
    localise,
    plan_step,
)
from ..samplers.prompt_syntax import PromptSyntaxError, parse_composable_prompt
from .contract import Technique, TwinSpec, check_number, encode_prompt, guider_and_patch, guider_inputs, install

CATEGORY = "Guidance Kit/composable"
TECHNIQUE = "Composable"
CONCEPT_KEY = "guidance_kit_concept"
WEIGHT_KEY = "guidance_kit_concept_weight"
LOCAL_KEYS = ("area", "mask", "timestep_start", "timestep_end")


# ---------------------------------------------------------------- compositions in CONDITIONING

def mark_concept(conditioning: list, weight: float) -> list:
    """``conditioning`` (one concept, any number of entries) tagged as a new concept of ``weight``."""
    concept = uuid.uuid4().hex
    return [[tensor, {**options, CONCEPT_KEY: concept, WEIGHT_KEY: float(weight)}] for tensor, options in conditioning]


def concept_groups(entries: list[dict]) -> list[tuple[float, list[int]]]:
    """(weight, entry indices) per concept, in order of first appearance; unmarked entries form one
    concept of weight 1."""
    groups: dict = {}
    for index, options in enumerate(entries):
        key = options.get(CONCEPT_KEY)
        weight = float(options.get(WEIGHT_KEY, 1.0)) if key is not None else 1.0
        if key in groups and groups[key][0] != weight:
            raise ValueError(f"{TECHNIQUE}: one concept carries two weights ({groups[key][0]} and {weight})")
        groups.setdefault(key, (weight, []))[1].append(index)
    return list(groups.values())


def check_composition(positive: list[dict], negative: list[dict] | None, where: str) -> list[tuple[float, list[int]]]:
    """The concepts of ``positive`` (entries as option dicts holding ``cross_attn``), with clear
    errors for compositions that cannot be sampled.  (While sampling, the negative may hold copies
    of positive area entries, marks included: ComfyUI pairs every area with an unconditional one.)"""
    groups = concept_groups(positive)
    check_weights([weight for weight, _ in groups], where)
    negative = negative or []
    widths = [(options["cross_attn"].shape[-1], "the negative's") for options in negative
              if options.get("cross_attn") is not None]
    for number, (_, indices) in enumerate(groups, 1):
        for index in indices:
            tensor = positive[index].get("cross_attn")
            if tensor is None:
                continue
            if widths and tensor.shape[-1] != widths[0][0]:
                raise ValueError(f"{where}: concept {number}'s conditioning is {tensor.shape[-1]} wide but "
                                 f"{widths[0][1]} is {widths[0][0]}: encode every concept and the negative with "
                                 "the same text encoder")
            widths = widths or [(tensor.shape[-1], f"concept {number}'s")]
    return groups


# ---------------------------------------------------------------- evaluation

def coverage(entries: list[dict], x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor | None:
    """Where (and how strongly) a concept applies at this step, in [0, 1] per latent element, the
    way calc_cond_batch weighs its entries; None when it applies everywhere."""
    if any("default" in e for e in entries) or not any(k in e for e in entries for k in LOCAL_KEYS):
        return None
    total = torch.zeros_like(x)
    for entry in entries:
        found = comfy.samplers.get_area_and_mult(entry, x, timestep)
        if found is None:
            continue
        target = total
        if found.area is not None:
            dims = len(found.area) // 2
            for i in range(dims):
                target = target.narrow(i + 2, found.area[i + dims], found.area[i])
        target += found.mult
    return total.clamp_(max=1.0)


class Composable(Technique):
    """[positive, negative] -> the composed (cond, uncond) pair; per-run state: the AG tracker."""

    name = TECHNIQUE
    node = "Composable"
    uses_slot = True
    needs_uncond = False

    def __init__(self, threshold: float):
        self.threshold = threshold

    def start_run(self, guider, sigmas, sampler):
        return ConvergenceTracker(self.threshold)

    def patch(self, patched, key):
        patched.model_options["disable_cfg1_optimization"] = True

    def evaluate(self, tracker: ConvergenceTracker, evaluator, run):
        positive, negative = evaluator.cond, evaluator.uncond
        if positive is None:
            return evaluator.passthrough()
        x, sigma = evaluator.x, evaluator.args["sigma"]
        groups = check_composition(positive, negative, TECHNIQUE)
        weights = [weight for weight, _ in groups]
        entries = [[positive[i] for i in indices] for _, indices in groups]
        coverages = [coverage(concept, x, sigma) for concept in entries]
        concepts, batch = len(groups), evaluator.batch
        guiding = tracker.guiding(evaluator.sigma, concepts, batch)
        if negative is None:  # an upstream patch dropped the unconditional: continue on the lead concept
            guiding = torch.zeros_like(guiding)
        plan = plan_step(guiding, lead_concept(weights, [c is None for c in coverages]))
        if negative is None and plan.uncond_row:
            raise ValueError(f"{TECHNIQUE}: the unconditional was skipped upstream, and no positive concept "
                             "can stand in for it")
        conds = [concept if needed else None for concept, needed in zip(entries, plan.concept_rows)]
        out = evaluator.evaluate_lists(conds + [negative if plan.uncond_row else None])
        uncond = out[concepts]
        predictions = out[:concepts]
        cosines, converged = self.observe(tracker, evaluator.sigma, plan, predictions, uncond, coverages)
        if uncond is not None:
            predictions = [None if p is None else localise(p, uncond, c) for p, c in zip(predictions, coverages)]
        guided, base = combine_step(plan, uncond, predictions, weights)
        if run is not None and run.current is not None:
            run.current.baseline_rows = (len(weights) + 1) * batch
            run.signal(weights=weights, concept_rows=[batch * int(needed) for needed in plan.concept_rows],
                       uncond_rows=batch * int(plan.uncond_row), cosine=cosines)
            for k in converged:
                run.mark(f"concept {k + 1} converged")
        return [guided, base]

    @staticmethod
    def observe(tracker, sigma, plan, predictions, uncond, coverages) -> tuple[list, list[int]]:
        """AG per concept, measured where both rows exist: (per-concept lowest cosine over the batch,
        None where not measured; the concepts that have now converged for every sample)."""
        if not tracker.enabled or uncond is None:
            return [None] * len(predictions), []
        cosine = torch.full(plan.guiding.shape, math.nan)
        for k, prediction in enumerate(predictions):
            if prediction is not None and plan.guiding[k].any() and (coverages[k] is None or coverages[k].any()):
                measured = concept_cosine(prediction, uncond, coverages[k]).cpu()
                cosine[k] = torch.where(plan.guiding[k].cpu(), measured, cosine[k])
        converged = tracker.observe(sigma, cosine, ~cosine.isnan())
        return [None if row.isnan().all() else float(row[~row.isnan()].min()) for row in cosine], converged


def patch_model(model, node_id: str | None = None, *, threshold: float):
    """A clone of ``model`` that samples compositions (and counts its rows); ``model`` is untouched."""
    check_number("Composable", "threshold", threshold, 0.0, 1.0, low_open=True)
    return install(model, Composable(threshold), node_id)


# ---------------------------------------------------------------- nodes

THRESHOLD_TOOLTIP = ("Adaptive Guidance per concept: once a concept's prediction reaches this cosine similarity "
                     "with the unconditional's, it stops costing model rows. 1 = never skip (exact composition).")


def _threshold_input():
    return io.Float.Input("threshold", default=1.0, min=0.5, max=1.0, step=0.0005, round=0.0001,
                          tooltip=THRESHOLD_TOOLTIP)


class ComposableConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitComposableConcept",
            display_name="Composable Concept (Guidance Kit)",
            category=CATEGORY,
            description="Adds one concept with its own signed weight to a composition (Composable Diffusion "
                        "AND; a negative weight is NOT). Chain one per concept, then use the Composable Guider "
                        "or KSampler with the Composable KSampler Patch.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The concept (e.g. a CLIP Text Encode output). Its "
                                      "area, mask, timestep range and ControlNet apply to this concept only."),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05, round=0.001,
                               tooltip="Signed weight, multiplied by the sampler's cfg: 1 = plain guidance "
                                       "strength, negative = NOT (steer away from this concept)."),
                io.Conditioning.Input("composition", optional=True,
                                      tooltip="The composition so far (another Composable Concept or Prompt). "
                                              "Empty: start a new composition."),
            ],
            outputs=[io.Conditioning.Output(display_name="composition")],
        )

    @classmethod
    def execute(cls, conditioning, weight, composition=None) -> io.NodeOutput:
        where = "Composable Concept"
        if not conditioning:
            raise ValueError(f"{where}: 'conditioning' is empty")
        if any(CONCEPT_KEY in options for _, options in conditioning):
            raise ValueError(f"{where}: 'conditioning' is already a composition; wire it into 'composition' "
                             "and add single concepts to it")
        check_number(where, "weight", weight, -MAX_WEIGHT, MAX_WEIGHT)
        earlier = len(concept_groups([options for _, options in composition])) if composition else 0
        if earlier >= MAX_CONCEPTS:
            raise ValueError(f"{where}: 'composition' already holds {earlier} concepts, at most {MAX_CONCEPTS}")
        return io.NodeOutput(list(composition or []) + mark_concept(conditioning, weight))


class ComposablePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitComposablePrompt",
            display_name="Composable Prompt (Guidance Kit)",
            category=CATEGORY,
            description="Encodes a composable prompt, e.g. 'a red circle AND a blue square :0.8 AND NOT green': "
                        "each concept is encoded separately and composed by its signed weight.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder used for every concept."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                default="a red circle AND a blue square AND NOT green",
                                tooltip="Concepts separated by AND (capitals); ':0.8' at the end of a concept sets "
                                        "its weight; 'NOT' before a concept negates it. \\AND, \\NOT and \\: are "
                                        "the literal text."),
                io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05, round=0.001,
                               tooltip="Weight of concepts without a ':weight' suffix (NOT negates it); "
                                       "multiplied by the sampler's cfg."),
            ],
            outputs=[io.Conditioning.Output(display_name="composition")],
        )

    @classmethod
    def execute(cls, clip, text, weight) -> io.NodeOutput:
        where = "Composable Prompt"
        if clip is None:
            raise ValueError(f"{where}: 'clip' is missing (the checkpoint has no text encoder)")
        check_number(where, "weight", weight, -MAX_WEIGHT, MAX_WEIGHT)
        try:
            concepts = parse_composable_prompt(text, weight)
        except PromptSyntaxError as error:
            raise ValueError(f"{where}: 'text': {error}") from error
        check_weights([concept.weight for concept in concepts], f"{where} 'text'")
        composition = []
        for concept in concepts:
            encoded = encode_prompt(clip, concept.text)
            composition += mark_concept(encoded, concept.weight)
        return io.NodeOutput(composition)


def _check_guider(composition, negative, threshold):
    where = "Composable Guider"
    if not composition:
        raise ValueError(f"{where}: 'composition' has no concepts")
    if any(CONCEPT_KEY in options for _, options in negative):
        raise ValueError(f"{where}: 'negative' is a composition; wire plain conditioning (e.g. an empty "
                         "prompt) as the unconditional")
    check_composition(comfy.sampler_helpers.convert_cond(composition),
                      comfy.sampler_helpers.convert_cond(negative), f"{where} 'composition'")


ComposableGuider, ComposableModelPatch = guider_and_patch(TwinSpec(
    name="Composable", category=CATEGORY, options=lambda: [_threshold_input()], patch=patch_model,
    check_guider=_check_guider,
    guider_id="GuidanceKitComposableGuider", guider_display="Composable Guider (Guidance Kit)",
    guider_description="Composable Diffusion: uncond + cfg * sum of weight_i * (concept_i - uncond), all concept "
                       "rows and the unconditional in one batched model call. For SamplerCustomAdvanced.",
    guider_inputs=lambda: guider_inputs(
        positive="composition", positive_tooltip="Concepts from Composable Concept / Composable Prompt (plain "
                                                 "conditioning is one concept of weight 1).",
        negative_tooltip="The unconditional every concept is measured against (usually an empty prompt).",
        cfg_default=7.5, cfg_tooltip="Guidance scale, multiplied into every concept weight (weight 1 at cfg s is "
                                     "plain CFG at s; cfg 1 uses the weights as absolute scales)."),
    patch_id="GuidanceKitComposableModelPatch", patch_display="Composable KSampler Patch (Guidance Kit)",
    patch_description="Lets a plain KSampler sample a composition wired as its positive: KSampler's cfg "
                      "multiplies every concept weight (the same result as the Composable Guider).",
))


NODES = [ComposableConcept, ComposablePrompt, ComposableGuider, ComposableModelPatch]
