"""The technique table: one ``Row`` per technique node of the pack, and how to build, guide and sample each on the
toy world (the ``toy`` fixture of conftest.py).  The contract suite (test_contract.py) and the reliability suite
(test_reliability.py) both run every row; a new technique node is one row here."""
import functools
import re
from dataclasses import dataclass
from typing import Callable

import torch

from harness.executor import run_node
from harness.sampling import cfg_guider, sample_guider

STEPS, BATCH, CFG = 3, 2, 4.0  # also the toy fixture's calibration (conftest.TOY_CALIBRATION)
DEEDIFF_THRESHOLD = 0.8  # some rows exit early, some run every block (so a foreign block 4 patch is reached)


@dataclass(frozen=True)
class Row:
    """A technique node: ``build(world, model)`` returns its GUIDER (guider rows) or patched MODEL."""

    node: str
    build: Callable
    guider: bool
    uses_slot: bool = True
    composes: bool = False  # samples a composition (Composable AND) rather than a plain prompt
    # The clear error (a regex after the node's name) the node raises when its toy-world inputs meet a model
    # of another family (tests/test_reliability.py); None: it samples every family.
    other_family_error: str | None = None
    samples_on: tuple[str, ...] = ()  # the tiny-model families it samples on despite an other_family_error
    plain_cfg: bool = False  # samples exactly what ComfyUI's CFGGuider samples (the baseline)
    # The main model evaluates more than one cond list per evaluation (False for Autoguidance: one main
    # row, one weak row), so ComfyUI's low-memory path has lists to split.
    splits: bool = True
    acts: tuple[str, ...] = ()  # the run-record names of what acts (RunStats.techniques_acted)
    # It acts only on evaluations with an unconditional (Technique.needs_uncond: AG, LinearAG) / it evaluates none
    # (Autoguidance: the weak model takes its place), so the first under the second is a clear error.
    needs_uncond: bool = False
    evaluates_uncond: bool = True

    def positive(self, world):
        return world.composition if self.composes else world.positive


def _nodes():
    from guidance_kit.nodes import adaptive_guidance as ag
    from guidance_kit.nodes import composable, deediff, linear_ag, reference_guider
    return ag, composable, linear_ag, reference_guider, deediff


def _gfcg_options(world, weak: bool) -> dict:
    return {"classifier": world.classifier, "clip": world.clip, "prompt": "a red circle on the left", "targets": "",
            "scale": 2.0, "confidence": 1.0, "start_percent": 0.0, "every": 1, "reference_row": "extra",
            **({"weak_model": world.weak, "reference_row": "guide"} if weak else {})}


def _reference_guidance(name, guider):
    """GFCG, GFCG + Autoguidance or Autoguidance (nodes/gfcg.py), as a GUIDER or a MODEL patch."""
    def build(world, model):
        from guidance_kit.nodes import gfcg

        if name == "atg":
            if guider:
                return run_node(gfcg.AutoguidanceGuider, model=model, positive=world.positive, negative=world.negative,
                                                       cfg=CFG, weak_model=world.weak)[0]
            return run_node(gfcg.AutoguidanceModelPatch, model, weak_model=world.weak)[0]
        options = _gfcg_options(world, weak=name == "gfcg_atg")
        if guider:
            return run_node(gfcg.GFCGGuider, model=model, positive=world.positive, negative=world.negative, cfg=CFG,
                                           **options)[0]
        return run_node(gfcg.GFCGModelPatch, model, **options)[0]
    return build


def _guider(name):
    def build(world, model):
        ag, composable, linear_ag, reference, _ = _nodes()
        if name == "reference":
            return run_node(reference.ReferenceCFGGuider, model, world.positive, world.negative, CFG)[0]
        if name == "ag":
            return run_node(ag.AdaptiveGuidanceGuider, model, world.positive, world.negative, CFG, threshold=0.98,
                                                     measure="auto", start_percent=0.0, end_percent=1.0)[0]
        if name == "linear_ag":
            return run_node(linear_ag.LinearAGGuider, model, world.positive, world.negative, CFG,
                                                    linear_ag=world.calibration, true_every=2, guided_until=0.7)[0]
        return run_node(composable.ComposableGuider, model, world.composition, world.negative, CFG, threshold=0.99)[0]
    return build


def _patch(name):
    def build(world, model):
        ag, composable, linear_ag, _, deediff = _nodes()
        if name == "deediff":
            return run_node(deediff.DeeDiffModelPatch, model, world.heads, threshold=DEEDIFF_THRESHOLD)[0]
        if name == "ag":
            return run_node(ag.AdaptiveGuidanceModelPatch, model, threshold=0.98, measure="auto", start_percent=0.0,
                                                         end_percent=1.0)[0]
        if name == "linear_ag":
            return run_node(linear_ag.LinearAGModelPatch, model, linear_ag=world.calibration, true_every=2,
                                                        guided_until=0.7)[0]
        return run_node(composable.ComposableModelPatch, model, threshold=0.99)[0]
    return build


# the toy world's CLIP (reference prompts) and weak DiT given to another family's model
GFCG_FAMILY = "'clip': the reference prompts"
WEAK_FAMILY = "'weak_model': a ToyWorldModel .*cannot guide"
@functools.cache
def _toy_classifier():
    from guidance_kit.samplers.classifier import toy_classifier
    from guidance_kit.toyworld import weights

    return toy_classifier(weights.CLASSIFIER_WEIGHTS, "contract")


def _ppap(guider):
    def build(world, model):
        from guidance_kit.nodes.ppap import TOY_EXPERTS, PPAPGuider, PPAPModelPatch

        options = (_toy_classifier(), TOY_EXPERTS, "colour: red", 7.5)  # the paper's scale
        if guider:
            return run_node(PPAPGuider, model, world.positive, world.negative, CFG, *options)[0]
        return run_node(PPAPModelPatch, model, *options)[0]
    return build


PPAP_FAMILY = "'experts': .* was trained on a .* model; this model samples as"


def _lina(guider, auto):
    """LINA (nodes/lina.py): the toy prompt with 'on the left' ablated; by hand or with the shipped predictor."""
    def build(world, model):
        from guidance_kit.nodes import lina

        ablated = run_node(lina.LINARelationPrompt, world.clip, "a red circle on the left", "on the left", 2)[0]
        if auto:
            options = (ablated, "toy_lina_predictor.safetensors")
            if guider:
                return run_node(lina.LINAAutoGuider, model, world.positive, world.negative, CFG, *options, 0.2)[0]
            return run_node(lina.LINAAutoModelPatch, model, *options)[0]
        options = (ablated, 1.0, 1.0, 0.5)
        if guider:
            return run_node(lina.LINAGuider, model, world.positive, world.negative, CFG, *options, 0.5, 0.2)[0]
        return run_node(lina.LINAModelPatch, model, *options)[0]
    return build


LINA_FAMILY = "'ablated' has width 128, the positive has"
LINA_AUTO_FAMILY = "'predictor': .* was written for another model"


@functools.cache
def toy_learned_ag_policy():
    """An Adaptive Guidance (learned) policy of the toy model at the table's STEPS and CFG (one prompt, one image)."""
    import nodes

    from guidance_kit.nodes.learned_ag import calibrate
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent, ToyWorldLoader

    model, clip, vae = run_node(ToyWorldLoader, "toy_dit.safetensors")
    positive, negative = (run_node(nodes.CLIPTextEncode, clip, text)[0] for text in ("a red circle on the left", ""))
    return calibrate(model, vae, [positive], negative, run_node(ToyWorldEmptyLatent, 1)[0], seed=0, steps=STEPS,
                     cfg=CFG, sampler_name="euler", scheduler="simple", tolerance=0.05)


def _learned_ag(guider):
    """Adaptive Guidance (learned) with the toy model's policy (``toy_learned_ag_policy``)."""
    def build(world, model):
        from guidance_kit.nodes.learned_ag import LearnedAGGuider, LearnedAGModelPatch

        if guider:
            return run_node(LearnedAGGuider, model, world.positive, world.negative, CFG, toy_learned_ag_policy(),
                            0.5)[0]
        return run_node(LearnedAGModelPatch, model, toy_learned_ag_policy(), 0.5)[0]
    return build


LEARNED_AG_FAMILY = "the policy was calibrated on model ToyWorldModel"

TABLE = [
    Row("Reference CFG Guider", _guider("reference"), guider=True, uses_slot=False, plain_cfg=True),
    Row("Adaptive Guidance Guider", _guider("ag"), guider=True, acts=("AG",), needs_uncond=True),
    Row("Adaptive Guidance", _patch("ag"), guider=False, acts=("AG",), needs_uncond=True),
    Row("LinearAG Guider", _guider("linear_ag"), guider=True, acts=("LinearAG",), needs_uncond=True,
        other_family_error="the calibration was fitted on model ToyWorldModel"),
    Row("LinearAG", _patch("linear_ag"), guider=False, acts=("LinearAG",), needs_uncond=True,
        other_family_error="the calibration was fitted on model ToyWorldModel"),
    Row("Adaptive Guidance (learned) Guider", _learned_ag(guider=True), guider=True, acts=("Learned AG",),
        needs_uncond=True, other_family_error=LEARNED_AG_FAMILY),
    Row("Adaptive Guidance (learned)", _learned_ag(guider=False), guider=False, acts=("Learned AG",),
        needs_uncond=True, other_family_error=LEARNED_AG_FAMILY),
    Row("Composable Guider", _guider("composable"), guider=True, composes=True, acts=("Composable",)),
    Row("Composable", _patch("composable"), guider=False, composes=True, acts=("Composable",)),
    Row("GFCG Guider", _reference_guidance("gfcg", True), guider=True, other_family_error=GFCG_FAMILY,
        acts=("GFCG",)),
    Row("GFCG", _reference_guidance("gfcg", False), guider=False, other_family_error=GFCG_FAMILY, acts=("GFCG",)),
    Row("GFCG + Autoguidance Guider", _reference_guidance("gfcg_atg", True), guider=True, splits=False,
        acts=("GFCG", "ATG"), evaluates_uncond=False, other_family_error=WEAK_FAMILY),
    Row("Autoguidance Guider", _reference_guidance("atg", True), guider=True, splits=False, acts=("ATG",),
        evaluates_uncond=False, other_family_error=WEAK_FAMILY),
    Row("Autoguidance", _reference_guidance("atg", False), guider=False, splits=False, acts=("ATG",),
        evaluates_uncond=False,
        other_family_error=WEAK_FAMILY),
    Row("PPAP Guider", _ppap(guider=True), guider=True, uses_slot=False, other_family_error=PPAP_FAMILY,
        acts=("PPAP",), samples_on=("sd3_flow",)),
    Row("PPAP Guidance", _ppap(guider=False), guider=False, uses_slot=False, other_family_error=PPAP_FAMILY,
        acts=("PPAP",), samples_on=("sd3_flow",)),
    Row("DeeDiff Early Exit", _patch("deediff"), guider=False, uses_slot=False, acts=("DeeDiff",),
        other_family_error="'(model' is a .* network|heads' were trained for another model)"),
    Row("LINA Guider, after LINA", _lina(True, False), guider=True, acts=("LINA",), needs_uncond=True,
        other_family_error=LINA_FAMILY),
    Row("LINA, after LINA", _lina(False, False), guider=False, acts=("LINA",), needs_uncond=True,
        other_family_error=LINA_FAMILY),
    Row("LINA Auto Guider, after LINA", _lina(True, True), guider=True, acts=("LINA",), needs_uncond=True,
        other_family_error=LINA_AUTO_FAMILY),
    Row("LINA Auto, after LINA", _lina(False, True), guider=False, acts=("LINA",), needs_uncond=True,
        other_family_error=LINA_AUTO_FAMILY),
]
PATCHES = [row for row in TABLE if not row.guider]
ids = [row.node for row in TABLE]


def technique_of(node: str) -> str:
    """A regex for the name errors give a node: its technique's, shared by both twins ("X Guider" -> "X")."""
    return re.escape(node.removesuffix(" Guider"))


def guider_of(row, world, model):
    built = row.build(world, model)
    return built if row.guider else cfg_guider(built, row.positive(world), world.negative, CFG)


def sample(guider, steps=STEPS, seed=0):
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    return sample_guider(guider, run_node(ToyWorldEmptyLatent, BATCH)[0], steps=steps, scheduler="simple", seed=seed)


def assert_image(samples):
    assert samples.shape == (BATCH, 3, 32, 32) and bool(torch.isfinite(samples).all())
