"""Composable Diffusion in ComfyUI: AND / NOT of weighted concepts (math in samplers/composable.py).

The composition travels *inside* a CONDITIONING, so it goes through ordinary wiring (reroutes,
Conditioning Combine, ControlNet Apply, area and mask nodes): each entry of a concept carries
``guidance_kit_concept`` (an id shared by the entries of one concept) and
``guidance_kit_concept_weight`` (its signed weight).  Entries without them form one more concept
of weight 1, so plain conditioning is a one-concept composition (plain CFG).

Guidance scale.  In ComfyUI's CFG the scale multiplies the guidance term; here it multiplies every
concept's weight, as A1111's ``AND`` does::

    denoised = uncond + cfg * sum_i w_i * (cond_i - uncond)

So weights are relative (paper defaults: every w_i = 1, cfg = 7.5; ``NOT`` = -1) and one concept of
weight 1 is plain CFG at ``cfg``, bit for bit.  For the paper's absolute weights set cfg = 1.
The KSampler path has the same meaning: KSampler's cfg is that scale (cfg 1 keeps the
unconditional: the patch turns off ComfyUI's cfg = 1 shortcut).

Evaluation.  A ``sampler_calc_cond_batch_function`` (installed on a clone; one installed before by
another pack is called in its place, with the expanded list) turns ComfyUI's [positive, negative]
into [concept_1, ..., concept_n, negative] and evaluates them through ONE ``calc_cond_batch``
call: ComfyUI batches every concept row and the unconditional into one model call when its
memory estimate allows, and falls back to separate calls for rows that cannot be concatenated
(different token counts beyond its padding limit, different ControlNets).  Each concept is its own
cond list, so its area, mask, timestep range, ControlNet and hooks apply to its rows only; where a
concept does not apply (outside its area or mask, outside its timestep range) it predicts the
unconditional (``samplers.composable.localise``).  The composed prediction is handed back as the
(cond, uncond) pair of ComfyUI's CFG, so sampler_cfg_function, pre- and post-CFG patches still run.

The guider is ComfyUI's CFGGuider over a clone carrying the same patch, so the guider and
KSampler + patch are one code path.  Adaptive Guidance per concept (``threshold`` < 1): see
samplers/composable.py; its per-run state is created by an OUTER_SAMPLE wrapper in the run's own
model_options.  Concept rows are skipped for the batch once every sample of the batch has
converged for that concept (ComfyUI evaluates a cond list on the whole latent batch, and
per-sample conditioning such as inpainting latents or ControlNet hints is aligned to batch
positions, so a sub-batch cannot be evaluated safely); each sample's output drops the concept's
term as soon as *it* has converged, so results never depend on what else is in the batch.
"""
import math
import uuid

import torch

import comfy.sampler_helpers
import comfy.samplers
from comfy.patcher_extension import WrappersMP
from comfy_api.latest import io

from ..samplers.composable import (ConvergenceTracker, check_weights, combine_step, concept_cosine, lead_concept,
                                   localise, plan_step)
from ..samplers.prompt_syntax import PromptSyntaxError, parse_composable_prompt
from .guiders import cfg_guider, model_input
from .run_stats import attach_run_stats, current_run, node_id_of

CATEGORY = "Guidance Kit/composable"
TECHNIQUE = "Composable"
CONCEPT_KEY = "guidance_kit_concept"
WEIGHT_KEY = "guidance_kit_concept_weight"
STATE_KEY = "guidance_kit.composable"
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


class ComposableCondBatch:
    """``sampler_calc_cond_batch_function``: [positive, negative] -> the composed (cond, uncond) pair."""

    def __init__(self, previous=None):
        self.previous = previous  # another pack's function, called in place of calc_cond_batch

    def evaluate(self, args: dict, conds: list) -> list:
        if self.previous is not None:
            return self.previous({**args, "conds": conds})
        return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"], args["model_options"])

    def __call__(self, args: dict) -> list:
        positive, negative = args["conds"]
        if positive is None:
            return self.evaluate(args, [positive, negative])
        x, sigma, model_options = args["input"], args["sigma"], args["model_options"]
        groups = check_composition(positive, negative, TECHNIQUE)
        weights = [weight for weight, _ in groups]
        entries = [[positive[i] for i in indices] for _, indices in groups]
        coverages = [coverage(concept, x, sigma) for concept in entries]
        tracker = model_options.get("transformer_options", {}).get(STATE_KEY)
        concepts, batch = len(groups), x.shape[0]
        if tracker is not None:
            guiding = tracker.guiding(float(sigma.flatten()[0]), concepts, batch)
        else:
            guiding = torch.ones(concepts, batch, dtype=torch.bool, device=x.device)
        if negative is None:  # an upstream patch dropped the unconditional: continue on the lead concept
            guiding = torch.zeros_like(guiding)
        plan = plan_step(guiding, lead_concept(weights, [c is None for c in coverages]))
        if negative is None and plan.uncond_row:
            raise ValueError(f"{TECHNIQUE}: the unconditional was skipped upstream, and no positive concept "
                             "can stand in for it")
        conds = [concept if needed else None for concept, needed in zip(entries, plan.concept_rows)]
        out = self.evaluate(args, conds + [negative if plan.uncond_row else None])
        uncond = out[concepts] if plan.uncond_row else None
        predictions = [out[k] if needed else None for k, needed in enumerate(plan.concept_rows)]
        cosines, converged = self.observe(tracker, sigma, plan, predictions, uncond, coverages)
        if uncond is not None:
            predictions = [None if p is None else localise(p, uncond, c) for p, c in zip(predictions, coverages)]
        guided, base = combine_step(plan, uncond, predictions, weights)
        self.record(model_options, plan, weights, batch, cosines, converged)
        return [guided, base]

    @staticmethod
    def observe(tracker, sigma, plan, predictions, uncond, coverages) -> tuple[list, list[int]]:
        """AG per concept, measured where both rows exist: (per-concept lowest cosine over the batch,
        None where not measured; the concepts that have now converged for every sample)."""
        if tracker is None or not tracker.enabled or uncond is None:
            return [None] * len(predictions), []
        cosine = torch.full(plan.guiding.shape, math.nan)
        for k, prediction in enumerate(predictions):
            if prediction is not None and plan.guiding[k].any() and (coverages[k] is None or coverages[k].any()):
                measured = concept_cosine(prediction, uncond, coverages[k]).cpu()
                cosine[k] = torch.where(plan.guiding[k].cpu(), measured, cosine[k])
        converged = tracker.observe(float(sigma.flatten()[0]), cosine, ~cosine.isnan())
        return [None if row.isnan().all() else float(row[~row.isnan()].min()) for row in cosine], converged

    @staticmethod
    def record(model_options, plan, weights, batch, cosines, converged) -> None:
        run = current_run(model_options)
        if run is None or run.current is None:
            return
        run.current.baseline_rows = (len(weights) + 1) * batch
        run.signal(weights=weights, concept_rows=[batch * int(needed) for needed in plan.concept_rows],
                   uncond_rows=batch * int(plan.uncond_row), cosine=cosines)
        for k in converged:
            run.mark(f"concept {k + 1} converged")


def _fresh_tracker(threshold: float):
    def wrapper(executor, *args, **kwargs):
        executor.class_obj.model_options.setdefault("transformer_options", {})[STATE_KEY] = ConvergenceTracker(threshold)
        return executor(*args, **kwargs)
    return wrapper


def patch_model(model, threshold: float, node_id: str | None = None):
    """A clone of ``model`` that samples compositions (and counts its rows); ``model`` is untouched."""
    patched = model.clone()
    previous = patched.model_options.get("sampler_calc_cond_batch_function")
    if isinstance(previous, ComposableCondBatch):  # patched twice: replace ours, keep what it chained
        previous = previous.previous
    patched.set_model_sampler_calc_cond_batch_function(ComposableCondBatch(previous))
    patched.model_options["disable_cfg1_optimization"] = True
    patched.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, STATE_KEY)
    if threshold < 1.0:
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, STATE_KEY, _fresh_tracker(threshold))
    attach_run_stats(patched, TECHNIQUE, node_id)
    return patched


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
        if not math.isfinite(weight):
            raise ValueError(f"{where}: 'weight' must be a finite number, got {weight}")
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
        try:
            concepts = parse_composable_prompt(text, weight)
        except PromptSyntaxError as error:
            raise ValueError(f"{where}: 'text': {error}") from error
        check_weights([concept.weight for concept in concepts], f"{where} 'text'")
        composition = []
        for concept in concepts:
            encoded = clip.encode_from_tokens_scheduled(clip.tokenize(concept.text))
            composition += mark_concept(encoded, concept.weight)
        return io.NodeOutput(composition)


class ComposableGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitComposableGuider",
            display_name="Composable Guider (Guidance Kit)",
            category=CATEGORY,
            description="Composable Diffusion: uncond + cfg * sum of weight_i * (concept_i - uncond), all concept "
                        "rows and the unconditional in one batched model call. For SamplerCustomAdvanced.",
            inputs=[
                model_input(),
                io.Conditioning.Input("composition", tooltip="Concepts from Composable Concept / Composable Prompt "
                                      "(plain conditioning is one concept of weight 1)."),
                io.Conditioning.Input("negative", tooltip="The unconditional every concept is measured against "
                                      "(usually an empty prompt)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Guidance scale, multiplied into every concept weight (weight 1 at cfg s "
                                       "is plain CFG at s; cfg 1 uses the weights as absolute scales)."),
                _threshold_input(),
            ],
            outputs=[io.Guider.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, composition, negative, cfg, threshold) -> io.NodeOutput:
        where = "Composable Guider"
        if not composition:
            raise ValueError(f"{where}: 'composition' has no concepts")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"{where}: 'threshold' must be in (0, 1], got {threshold}")
        if any(CONCEPT_KEY in options for _, options in negative):
            raise ValueError(f"{where}: 'negative' is a composition; wire plain conditioning (e.g. an empty "
                             "prompt) as the unconditional")
        check_composition(comfy.sampler_helpers.convert_cond(composition),
                          comfy.sampler_helpers.convert_cond(negative), f"{where} 'composition'")
        return io.NodeOutput(cfg_guider(patch_model(model, threshold, node_id_of(cls)), composition, negative, cfg))


class ComposableModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitComposableModelPatch",
            display_name="Composable KSampler Patch (Guidance Kit)",
            category=CATEGORY,
            description="Lets a plain KSampler sample a composition wired as its positive: KSampler's cfg "
                        "multiplies every concept weight (the same result as the Composable Guider).",
            inputs=[
                model_input(),
                _threshold_input(),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, threshold) -> io.NodeOutput:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"Composable KSampler Patch: 'threshold' must be in (0, 1], got {threshold}")
        return io.NodeOutput(patch_model(model, threshold, node_id_of(cls)))


NODES = [ComposableConcept, ComposablePrompt, ComposableGuider, ComposableModelPatch]
