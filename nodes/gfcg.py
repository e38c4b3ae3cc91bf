"""GFCG and Autoguidance in ComfyUI: GUIDER + MODEL-patch twins over ``samplers/gfcg.py`` and
``samplers/autoguidance.py``, installed through the technique contract (``nodes/contract``).

One technique, ``ReferenceGuidance``, covers the four configurations; per evaluation and sample it
returns ComfyUI's ``[cond, uncond]`` pair so that the stock combine ``uncond + s·(cond − uncond)``
(s = the guider's cfg) gives the guided prediction:

=====================  ====================================  ==================================
configuration          guide row G (the "uncond" returned)   rows per sample and evaluation
=====================  ====================================  ==================================
CFG (no technique)     main(∅)                               2 main
Autoguidance           weak(c)                               1 main + 1 weak
GFCG + CFG, extra      main(∅); cond += (w/s)(P − main(c_r))  2 main + 1 main where w > 0
GFCG + CFG, guide      main(c_r) where w > 0, else main(∅)    2 main
GFCG + ATG, extra      weak(c); cond += (w/s)(P − main(c_r))  1 main + 1 weak + 1 main where w > 0
GFCG + ATG, guide      weak(c_r) where w > 0, else weak(c)    1 main + 1 weak
=====================  ====================================  ==================================

P = main(c).  In ``guide`` mode the returned cond is P + (w/s)(P − G) for active samples, so the
result is G + (s + w)(P − G): the reference takes the guide row's place and the scale grows by w.

The classifier reads the previous evaluation's guided clean estimate (the first evaluation of a
run has none: no GFCG there), so every row of an evaluation is known before it is evaluated.
Reference conditionings are the prompt with each head's target phrase replaced by another class's
phrase, encoded once when the node runs, and processed with the sampler's own conds (they are added
to the run's copy of the guider's conds at the start of the run).

The weak model of Autoguidance is evaluated with ``calc_cond_batch`` on its own patcher and
options (its own patches and wrappers; the main model's post-CFG functions run once, on the
combined result), with the main model's processed conds (so SDXL's ``y`` reaches it), and loaded
with the main model (an additional model of the clone).  Its rows are added to the run statistics.
"""
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

import torch

import comfy.sampler_helpers
import comfy.samplers
from comfy_api.latest import io

from ..samplers import gfcg
from ..samplers.autoguidance import autoguide
from .classifier import ClassifierType, pixel_reader
from .contract import (
    Technique,
    TwinSpec,
    broadcast_to_batch,
    check_number,
    encode_prompt,
    guider_and_patch,
    install,
    sampler_cfg,
)

CATEGORY = "Guidance Kit/guidance"
logger = logging.getLogger(__name__)


@dataclass
class ReferencePrompts:
    """The classifier heads GFCG guides, each head's target class, and the raw conditioning of the
    prompt with the target phrase replaced by each class's phrase (``variants[head][k]``; the
    target's own entry is the prompt itself)."""

    heads: list[str]
    targets: dict[str, int]
    variants: dict[str, list[list]] = field(default_factory=dict)


def phrase_in(prompt: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(phrase)}(?![\w])", prompt, flags=re.IGNORECASE) is not None


def replace_phrase(prompt: str, phrase: str, replacement: str) -> str:
    return re.sub(rf"(?<![\w]){re.escape(phrase)}(?![\w])", lambda _: replacement, prompt, flags=re.IGNORECASE)


def parse_targets(text: str, classifier, where: str) -> dict[str, str]:
    """``head=class, ...`` (or a bare class of a single-head classifier) -> {head: class}."""
    targets = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        head, _, name = entry.rpartition("=")
        head = head.strip() or (next(iter(classifier.heads)) if len(classifier.heads) == 1 else "")
        if not head:
            raise ValueError(f"{where}: write targets as head=class ({', '.join(classifier.heads)}), got {entry!r}")
        classifier.class_index(head, name.strip(), where)
        targets[head] = name.strip()
    return targets


def find_targets(prompt: str, classifier, given: dict[str, str], where: str) -> dict[str, int]:
    """Each guided head's target class: the ``given`` heads only when any are given, else every
    head with exactly one class phrase in the prompt (a head with several needs an explicit target)."""
    if given:
        return {head: classifier.class_index(head, name, where) for head, name in given.items()}
    targets = {}
    for head, names in classifier.heads.items():
        found = [k for k in range(len(names)) if phrase_in(prompt, classifier.phrase(head, k))]
        if len(found) > 1:
            raise ValueError(f"{where} 'targets': the prompt names several {head} classes "
                             f"({', '.join(names[k] for k in found)}); give the target as {head}=class")
        if found:
            targets[head] = found[0]
    if not targets:
        raise ValueError(f"{where} 'prompt': no class of the classifier ({classifier.label}) occurs in the prompt; "
                         f"name the target in 'targets'")
    return targets


def reference_prompts(clip, classifier, prompt: str, targets_text: str, where: str) -> ReferencePrompts:
    """Encode the prompt once per reference class of every guided head (node execution, not per step)."""
    targets = find_targets(prompt, classifier, parse_targets(targets_text, classifier, f"{where} 'targets'"), where)
    prompts = ReferencePrompts(list(targets), targets)
    for head, target in targets.items():
        phrase = classifier.phrase(head, target)
        if not phrase_in(prompt, phrase):
            raise ValueError(f"{where} 'prompt': the target phrase {phrase!r} of {head} does not occur in the prompt")
        texts = [replace_phrase(prompt, phrase, classifier.phrase(head, k)) for k in range(len(classifier.heads[head]))]
        prompts.variants[head] = [encode_prompt(clip, text) for text in texts]
    return prompts


def stack_per_sample(choices: list[list]) -> list:
    """One processed cond list whose per-sample tensors come from ``choices[i]`` (a processed list
    per sample, all of one prompt structure): sample i reads its own reference conditioning."""
    batch = len(choices)
    stacked = []
    for j, entry in enumerate(choices[0]):
        entry = entry.copy()
        model_conds = {}
        for name, value in entry["model_conds"].items():
            tensors = [getattr(choice[j]["model_conds"][name], "cond", None) for choice in choices]
            if not all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in tensors):
                model_conds[name] = value
                continue
            rows = [broadcast_to_batch(t, batch)[i:i + 1] for i, t in enumerate(tensors)]
            if len({r.shape for r in rows}) > 1 and name == "c_crossattn":
                tokens = max(r.shape[1] for r in rows)
                rows = [r.repeat(1, tokens // r.shape[1], *([1] * (r.ndim - 2))) for r in rows]
            model_conds[name] = value._copy_with(torch.cat(rows))
        entry["model_conds"] = model_conds
        stacked.append(entry)
    return stacked


@dataclass
class GFCGOptions:
    classifier: object
    prompts: ReferencePrompts
    max_scale: float
    confidence: float
    start_percent: float
    every: int
    reference_row: str


class ReferenceRun:
    """Per-run state: the guider (its processed conds), cfg, the pixel reader, the reading schedule,
    the previous evaluation's guided clean estimate, the classifier's time."""

    def __init__(self, technique: "ReferenceGuidance", guider, key: str):
        self.guider = guider
        self.scale = sampler_cfg(guider)
        self.key = key
        options = technique.gfcg
        start_sigma = float(guider.model_patcher.get_model_object("model_sampling").percent_to_sigma(
            options.start_percent)) if options else 0.0
        self.schedule = gfcg.ReadingSchedule(options.every, start_sigma) if options else None
        self.read = pixel_reader(technique.gfcg.classifier, guider.model_patcher, technique.node) \
            if technique.gfcg else None
        self.previous_denoised = None
        self.classifier_seconds = 0.0
        self.last_choice: list[str | None] = []
        if technique.gfcg and self.scale <= 0:
            raise ValueError(f"{technique.node}: GFCG needs a guidance scale (cfg) above 0, got {self.scale}")


class ReferenceGuidance(Technique):
    """GFCG, Autoguidance, or both (module docstring)."""

    uses_slot = True

    def __init__(self, weak=None, options: GFCGOptions | None = None):
        self.weak = weak
        self.gfcg = options
        self.node = "GFCG + Autoguidance" if weak is not None and options else "GFCG" if options else "Autoguidance"
        self.name = "+".join(n for n, on in (("GFCG", options), ("ATG", weak)) if on)
        self.needs_uncond = options is None  # GFCG alone at cfg 1: D = D(c) + w·(D(c) − D(c_ref))
        self.conds_key = f"guidance_kit.gfcg.{uuid.uuid4().hex[:8]}"

    def stacked_on(self, earlier: "ReferenceGuidance") -> "ReferenceGuidance":
        """GFCG over Autoguidance (or the reverse) is GFCG + Autoguidance; a part both give comes from this one."""
        return ReferenceGuidance(weak=self.weak if self.weak is not None else earlier.weak,
                                 options=self.gfcg or earlier.gfcg)

    def variant_key(self, head: str, k: int) -> str:
        return f"{self.conds_key}.{head}.{k}"

    def check_variants(self, guider) -> None:
        """The reference prompts must be conditioning of the sampled model's kind (same embedding width
        and extra inputs as the positive), i.e. encoded by that model's CLIP."""
        positive = guider.conds.get("positive") or []
        variant = comfy.sampler_helpers.convert_cond(next(iter(self.gfcg.prompts.variants.values()))[0])
        if not positive or not variant:
            return
        mine, theirs = positive[0], variant[0]
        width = [entry["cross_attn"].shape[-1] if isinstance(entry.get("cross_attn"), torch.Tensor) else None
                 for entry in (mine, theirs)]
        if width[0] != width[1] or ("pooled_output" in mine) != ("pooled_output" in theirs):
            raise ValueError(f"{self.node}: 'clip': the reference prompts it encodes (width {width[1]}) do not fit "
                             f"the positive conditioning (width {width[0]}); connect the CLIP of the sampled model")

    def warn_unless_prompt_is_positive(self, guider) -> None:
        """GFCG's 'prompt' must be the positive's text (its reference prompts are edits of it); warn when the
        positive conditioning is not that text's encoding, e.g. the prompt names red, the positive blue."""
        head, target = next(iter(self.gfcg.prompts.targets.items()))
        prompt = comfy.sampler_helpers.convert_cond(self.gfcg.prompts.variants[head][target])[0].get("cross_attn")
        positives = [entry.get("cross_attn") for entry in guider.conds.get("positive") or []]
        if any(isinstance(p, torch.Tensor) and p.shape == prompt.shape and torch.allclose(p.float(), prompt.float(),
                                                                                          atol=1e-4)
               for p in positives):
            return
        logger.warning(f"{self.node}: 'prompt' is not the text of the positive conditioning, so the reference "
                       f"prompts (the prompt with {head} changed) may contradict it; connect the positive's text")

    def start_run(self, guider, sigmas, sampler):
        if self.gfcg:
            self.check_variants(guider)
            self.warn_unless_prompt_is_positive(guider)
        if self.weak is not None:
            self.weak.pre_run()  # ComfyUI prepares only the sampled patcher; the weak one is cleaned up with it
        if self.gfcg:
            for head, variants in self.gfcg.prompts.variants.items():
                for k, conditioning in enumerate(variants):
                    guider.conds[self.variant_key(head, k)] = [entry.copy() for entry in
                                                               comfy.sampler_helpers.convert_cond(conditioning)]
        return ReferenceRun(self, guider, self.conds_key)

    def patch(self, patched, key):
        if self.weak is not None:
            patched.set_additional_models(key, [self.weak])

    # ---------------------------------------------------------------- rows

    def _weak(self, evaluator, cond_list, rows, run):
        """The weak model's prediction for ``cond_list`` on the samples ``rows`` (None: all)."""
        x, timestep, restrict = evaluator.sub_batch(rows)
        cond = restrict(cond_list)
        out = comfy.samplers.calc_cond_batch(self.weak.model, [cond], x, timestep, self.weak.model_options)[0]
        if run is not None:
            run.count_rows(int(x.shape[0]) * len(cond), evaluator.sigma)
        return out

    def _reference_list(self, state: ReferenceRun, reference: gfcg.Reference):
        heads = self.gfcg.prompts.heads
        return stack_per_sample([state.guider.conds[self.variant_key(heads[h], k)]
                                 for h, k in zip(reference.head.tolist(), reference.index.tolist())])

    def _read(self, state: ReferenceRun, evaluator) -> gfcg.Reference | None:
        """The reference of this evaluation: None outside GFCG's window (or for a sub-batch a chained
        caller asks for), a fresh classifier reading when due, else the last one."""
        previous = state.previous_denoised
        if previous is None or previous.shape[0] != evaluator.batch or not state.schedule.acts(evaluator.sigma):
            return None
        if not state.schedule.due():
            return state.schedule.last
        start = time.perf_counter()
        with torch.no_grad():
            probabilities = self.gfcg.classifier.probabilities(state.read(previous))
        state.schedule.last = gfcg.choose_reference(probabilities, self.gfcg.prompts.targets, self.gfcg.max_scale,
                                                    self.gfcg.confidence)
        state.classifier_seconds += time.perf_counter() - start
        return state.schedule.last

    def evaluate(self, state: ReferenceRun, evaluator, run):
        if evaluator.cond is None:  # a chained caller asking for the unconditional alone: nothing to guide
            return evaluator.passthrough()
        reference = self._read(state, evaluator) if self.gfcg else None
        active = reference.active.to(evaluator.x.device) if reference is not None else None
        any_active = active is not None and bool(active.any())
        unguided = self.weak is None and evaluator.uncond is None  # cfg 1: ComfyUI evaluates no uncond
        guide_mode = any_active and self.gfcg.reference_row == "guide" and not unguided
        ref_list = self._reference_list(state, reference) if any_active else None
        rows = active.nonzero().flatten() if any_active else None
        others = (~active).nonzero().flatten() if any_active else None
        if unguided:
            positive = evaluator(True, False)[0]
            guide_rows = positive
        elif self.weak is None:
            if guide_mode:
                positive = evaluator(True, False)[0]
                guide_rows = torch.empty_like(positive)
                if others.numel():
                    guide_rows[others] = evaluator(False, True, others)[1]
                guide_rows[rows] = evaluator.evaluate_lists([None, ref_list], rows)[1]
            else:
                positive, guide_rows = evaluator(True, True)
        else:
            positive = evaluator(True, False)[0]
            if guide_mode:
                guide_rows = torch.empty_like(positive)
                if others.numel():
                    guide_rows[others] = self._weak(evaluator, evaluator.cond, others, run)
                guide_rows[rows] = self._weak(evaluator, ref_list, rows, run)
            else:
                guide_rows = self._weak(evaluator, evaluator.cond, None, run)
        cond = positive
        if any_active:
            if guide_mode:
                reference_rows = guide_rows
            else:
                reference_rows = positive.clone()
                reference_rows[rows] = evaluator.evaluate_lists([ref_list, None], rows)[0]
            cond = gfcg.guide(positive, positive, reference_rows, reference.scale.to(positive.device) / state.scale)
        state.previous_denoised = autoguide(cond, guide_rows, state.scale)
        if run is not None and reference is not None:
            self._report(state, reference, run)
        return [cond, guide_rows]

    def _report(self, state: ReferenceRun, reference: gfcg.Reference, run) -> None:
        heads = self.gfcg.prompts.heads
        active = reference.active.tolist()
        names = [f"{heads[h]}={self.gfcg.classifier.heads[heads[h]][k]}" if on else None
                 for h, k, on in zip(reference.head.tolist(), reference.index.tolist(), active)]
        least_sure = torch.stack(list(reference.target_probability.values())).min(dim=0).values
        run.signal(reference_class=[float(k) if on else None for k, on in zip(reference.index.tolist(), active)],
                   gfcg_scale=reference.scale, target_probability=least_sure,
                   classifier_seconds=state.classifier_seconds)
        for sample, name in enumerate(names):
            before = state.last_choice[sample] if sample < len(state.last_choice) else None
            if name != before:
                run.mark(f"sample {sample}: reference {name}" if name else f"sample {sample}: no reference")
        state.last_choice = names


# ---------------------------------------------------------------- nodes

def check_weak(model, weak, where: str) -> None:
    """The weak model must be a separate network of the same family and noise schedule."""
    if weak.model is model.model:
        raise ValueError(f"{where}: 'weak_model': it shares its network with the main model (the same loaded "
                         f"checkpoint, or a clone of it: ComfyUI de-duplicates two identical loads), so their "
                         f"weights and patches would collide; load the weaker checkpoint separately")
    if type(weak.model) is not type(model.model) or weak.model.model_type != model.model.model_type:
        raise ValueError(f"{where}: 'weak_model': a {type(weak.model).__name__} ({weak.model.model_type.name}) cannot "
                         f"guide a {type(model.model).__name__} ({model.model.model_type.name}); it must be the "
                         f"same model family, given the same conditioning")
    mine, theirs = (m.get_model_object("model_sampling") for m in (model, weak))
    if not torch.allclose(mine.sigmas.float().cpu(), theirs.sigmas.float().cpu()):
        raise ValueError(f"{where}: 'weak_model': its noise schedule (model sampling) differs from the main "
                         f"model's; patch both with the same model-sampling node")


def patch_autoguidance(model, node_id, weak_model):
    """A clone of ``model`` whose guide row is ``weak_model``'s conditional prediction (cfg = w)."""
    check_weak(model, weak_model, "Autoguidance")
    return install(model, ReferenceGuidance(weak=weak_model.clone()), node_id)


def patch_gfcg(model, node_id, classifier, clip, prompt, targets, scale, confidence, start_percent, every,
               reference_row, weak_model=None):
    """A clone of ``model`` with GFCG (and Autoguidance when ``weak_model`` is given) installed."""
    where = "GFCG + Autoguidance" if weak_model is not None else "GFCG"
    check_number(where, "scale", scale, 0.0, 100.0)
    check_number(where, "confidence", confidence, 0.0, 1.0)
    check_number(where, "start_percent", start_percent, 0.0, 1.0)
    check_number(where, "every", every, 1, 100)
    if reference_row not in gfcg.REFERENCE_ROWS:
        raise ValueError(f"{where}: 'reference_row' must be one of {gfcg.REFERENCE_ROWS}, got {reference_row!r}")
    if weak_model is not None:
        check_weak(model, weak_model, where)
    prompts = reference_prompts(clip, classifier, prompt, targets, where)
    pixel_reader(classifier, model, where)
    options = GFCGOptions(classifier, prompts, float(scale), float(confidence), float(start_percent), int(every),
                          reference_row)
    weak = weak_model.clone() if weak_model is not None else None
    return install(model, ReferenceGuidance(weak=weak, options=options), node_id)


def weak_model_input(optional: bool = False):
    return io.Model.Input("weak_model", optional=optional,
                          tooltip="A weaker version of the same model (smaller or shorter-trained, e.g. the toy "
                                  "world's toy_dit_weak), loaded by its own loader node. It gets the same "
                                  "conditioning as the main model." +
                                  (" Connected: GFCG + Autoguidance (cfg is then Autoguidance's w)." if optional
                                   else ""))


def autoguidance_inputs() -> list:
    from .contract import guider_inputs

    return guider_inputs(cfg_default=2.0, cfg_tooltip="Autoguidance weight w: D = D_weak + w·(D_main − D_weak) "
                                                      "(the paper's presets use 1.7-2.9; 1 = the main model alone).",
                         negative_tooltip="Not evaluated by Autoguidance (the weak model replaces the "
                                          "unconditional); connect any conditioning.")


def gfcg_options() -> list:
    return [
        ClassifierType.Input("classifier", tooltip="Reads each sample's clean estimate (Load Classifier, CLIP "
                                                   "Zero-Shot Classifier)."),
        io.Clip.Input("clip", tooltip="Encodes the reference prompts (once, when this node runs)."),
        io.String.Input("prompt", multiline=True, default="a large red circle on the left",
                        tooltip="The positive prompt's text (connect the same text as the positive "
                                "CLIPTextEncode). A reference prompt replaces a target class phrase by "
                                "another class's phrase."),
        io.String.Input("targets", default="", tooltip="The heads to guide and their target classes, 'head=class, "
                                                       "...'. Empty: every head whose class phrase occurs in the "
                                                       "prompt, with that class as its target."),
        io.Float.Input("scale", default=2.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="w_max: the extra guidance of a sample sure of the wrong class "
                               "(w = w_max · p_ref / (p_ref + p_target))."),
        io.Float.Input("confidence", default=0.9, min=0.0, max=1.0, step=0.01,
                       tooltip="No extra guidance (and no reference row) for a sample whose target class "
                               "probability reaches this."),
        io.Float.Input("start_percent", default=0.3, min=0.0, max=1.0, step=0.01,
                       tooltip="GFCG acts from this point of the schedule on: earlier clean estimates are blurs "
                               "the classifier misreads (0.3 = from sigma 0.7 on a flow model)."),
        io.Int.Input("every", default=1, min=1, max=100,
                     tooltip="Read the classifier every k evaluations (reusing its last reading in between)."),
        io.Combo.Input("reference_row", options=list(gfcg.REFERENCE_ROWS), default="extra",
                       tooltip="extra: a third row D(c_ref) for the confused samples, on top of CFG/Autoguidance. "
                               "guide: c_ref takes the guide row's place (no extra row)."),
        weak_model_input(optional=True),
    ]


AutoguidanceGuider, AutoguidanceModelPatch = guider_and_patch(TwinSpec(
    name="Autoguidance", guider_id="GuidanceKitAutoguidanceGuider",
    guider_display="Autoguidance Guider (Guidance Kit)", patch_id="GuidanceKitAutoguidance",
    patch_display="Autoguidance (Guidance Kit)", category=CATEGORY,
    guider_description="Guides the model with a weaker version of itself instead of the unconditional "
                       "(Autoguidance, Karras et al. 2024): D = D_weak(c) + w·(D_main(c) − D_weak(c)). "
                       "2 rows per sample per step, like CFG (one main, one weak).",
    patch_description="MODEL patch for KSampler: the guide row becomes the weak model's conditional prediction "
                      "(Autoguidance, Karras et al. 2024); KSampler's cfg is w.",
    options=lambda: [weak_model_input()], patch=patch_autoguidance, guider_inputs=autoguidance_inputs))

GFCGGuider, GFCGModelPatch = guider_and_patch(TwinSpec(
    name="GFCG", guider_id="GuidanceKitGFCGGuider", guider_display="GFCG Guider (Guidance Kit)",
    patch_id="GuidanceKitGFCG", patch_display="GFCG (Guidance Kit)", category=CATEGORY,
    guider_description="Gradient-free classifier guidance (arXiv 2411.15393): a classifier reads each sample's "
                       "clean estimate, picks the class it is drifting to and a scale, and guidance pushes from "
                       "that reference class's prediction to the target's, on top of CFG or Autoguidance.",
    patch_description="MODEL patch for KSampler: gradient-free classifier guidance (arXiv 2411.15393) on top of "
                      "KSampler's CFG (or Autoguidance with a weak model).",
    options=gfcg_options, patch=patch_gfcg))

NODES = [GFCGGuider, GFCGModelPatch, AutoguidanceGuider, AutoguidanceModelPatch]
