"""The technique contract, table-driven: one row per technique node (a new node is one row).

Every row is checked for: the input MODEL untouched; fresh state every run (runs of other lengths in
between change nothing); a foreign hook in every slot still runs; stacking with every other pack
patch in both orders gives a defined result; ComfyUI's own SkipLayerGuidanceDiTSimple,
PerpNegGuider and APG either work with it or raise an error naming both nodes.  All on the toy
world's DiT (it honours ComfyUI's ``patches_replace`` block patches like Flux's single blocks).
"""
import copy
import functools
import itertools
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import comfy.samplers
import nodes
from comfy.patcher_extension import WrappersMP
from comfy_extras.nodes_apg import APG
from comfy_extras.nodes_perpneg import PerpNegGuider
from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple

from harness.executor import run_node
from harness.sampling import cfg_guider, sample_guider

STEPS, BATCH, CFG = 3, 2, 4.0
DEEDIFF_THRESHOLD = 0.8  # some rows exit early, some run every block (so a foreign block 4 patch is reached)


@dataclass
class World:
    model: object
    positive: list
    composition: list
    negative: list
    calibration: object
    clip: object = None
    weak: object = None
    classifier: object = None
    heads: object = None


@pytest.fixture(scope="module")
def world():
    from guidance_kit.nodes.composable import ComposablePrompt
    from guidance_kit.nodes.linear_ag import calibrate
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent, ToyWorldLoader

    model, clip, _ = run_node(ToyWorldLoader, "toy_dit.safetensors")
    encode = functools.partial(run_node, nodes.CLIPTextEncode)
    positive, negative = encode(clip, "a red circle on the left")[0], encode(clip, "")[0]
    composition = run_node(ComposablePrompt, clip, "a red circle AND a blue square", 1.0)[0]
    calibration = calibrate(model, [positive], negative, run_node(ToyWorldEmptyLatent, 1)[0], seed=0, steps=STEPS,
                            cfg=CFG, sampler_name="euler", scheduler="simple")
    from guidance_kit.nodes.classifier import TOY_CHOICE, LoadClassifier
    from guidance_kit.nodes.deediff import DeeDiffLoad

    weak = run_node(ToyWorldLoader, "toy_dit_weak.safetensors")[0]
    return World(model, positive, composition, negative, calibration, clip, weak,
                 run_node(LoadClassifier, TOY_CHOICE, "auto")[0], run_node(DeeDiffLoad, "toy_dit_heads.safetensors")[0])


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

TABLE = [
    Row("Reference CFG Guider", _guider("reference"), guider=True, uses_slot=False, plain_cfg=True),
    Row("Adaptive Guidance Guider", _guider("ag"), guider=True, acts=("AG",), needs_uncond=True),
    Row("Adaptive Guidance", _patch("ag"), guider=False, acts=("AG",), needs_uncond=True),
    Row("LinearAG Guider", _guider("linear_ag"), guider=True, acts=("LinearAG",), needs_uncond=True,
        other_family_error="the calibration was fitted on model ToyWorldModel"),
    Row("LinearAG", _patch("linear_ag"), guider=False, acts=("LinearAG",), needs_uncond=True,
        other_family_error="the calibration was fitted on model ToyWorldModel"),
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


def snapshot(model):
    return (copy.copy(model.model_options), {k: {n: list(v) for n, v in w.items()} for k, w in model.wrappers.items()},
            dict(model.attachments), dict(model.callbacks), copy.copy(model.model_options.get("transformer_options")))


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_input_model_untouched(world, row):
    before = snapshot(world.model)
    sample(guider_of(row, world, world.model))
    assert snapshot(world.model) == before


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_fresh_state_every_run(world, row):
    guider = guider_of(row, world, world.model)
    first, longer, again = sample(guider, STEPS), sample(guider, STEPS + 2), sample(guider, STEPS)
    assert torch.equal(first, again)
    assert torch.equal(first, sample(guider_of(row, world, world.model), STEPS))
    assert torch.equal(longer, sample(guider_of(row, world, world.model), STEPS + 2))


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_foreign_hooks_in_every_slot_still_run(world, row):
    calls = {}

    def seen(name):
        calls[name] = calls.get(name, 0) + 1

    def wrapper(name):
        def wrap(executor, *args, **kwargs):
            seen(name)
            return executor(*args, **kwargs)
        return wrap

    def calc_cond_batch(args):
        seen("calc_cond_batch_function")
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])

    def unet_wrapper(apply_model, args):
        seen("model_function_wrapper")
        return apply_model(args["input"], args["timestep"], **args["c"])

    def post_cfg(args):
        seen("post_cfg_function")
        return args["denoised"]

    def block(args, extra):
        seen("block_replace")
        return extra["original_block"](args)

    model = world.model.clone()
    model.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    model.set_model_unet_function_wrapper(unet_wrapper)
    model.set_model_sampler_post_cfg_function(post_cfg)
    model.set_model_patch_replace(block, "dit", "single_block", 3)
    slots = (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.CALC_COND_BATCH, WrappersMP.APPLY_MODEL,
             WrappersMP.DIFFUSION_MODEL)
    for slot in slots:
        model.add_wrapper_with_key(slot, "test.foreign", wrapper(slot))
    assert_image(sample(guider_of(row, world, model)))
    expected = {*slots, "calc_cond_batch_function", "model_function_wrapper", "post_cfg_function", "block_replace"}
    assert set(calls) == expected


PAIRS = list(itertools.product(PATCHES, TABLE))


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a.node} then {b.node}" for a, b in PAIRS])
def test_every_pair_of_pack_nodes_stacks(world, first, second):
    """A patch under every node of the pack (itself included): both act (their run record says so), or a clear
    error naming both.  This crashed for Adaptive Guidance under Composable (a chained function was handed
    n + 1 cond lists), and dropped Autoguidance under GFCG and AG/LinearAG under Autoguidance silently."""
    from guidance_kit.nodes.contract.stats import stats_sink

    stacked = first.build(world, world.model)
    guider = second.build(world, stacked) if second.guider else \
        cfg_guider(second.build(world, stacked), (first.composes or second.composes) and world.composition
                   or world.positive, world.negative, CFG)
    if first.needs_uncond and not second.evaluates_uncond:
        below, above = technique_of(first.node), technique_of(second.node)
        with pytest.raises(RuntimeError, match=rf"{below}: '{above}' above it evaluates no unconditional"):
            sample(guider)
        return
    assert_image(sample(guider))
    acted = {part for name in stats_sink(guider.model_patcher).last.techniques_acted for part in name.split("+")}
    assert set(first.acts) | set(second.acts) <= acted, f"only {sorted(acted)} acted"


def _slg(model):
    return run_node(SkipLayerGuidanceDiTSimple, model, 0.0, 1.0, double_layers="", single_layers="3")[0]


def _apg(model):
    return run_node(APG, model, 0.5, 0.0, 0.0)[0]


@pytest.mark.parametrize("row", TABLE, ids=ids)
@pytest.mark.parametrize("comfy_patch", [_slg, _apg], ids=["SkipLayerGuidanceDiTSimple", "APG"])
def test_over_comfyui_patches(world, row, comfy_patch):
    assert_image(sample(guider_of(row, world, comfy_patch(world.model))))


@pytest.mark.parametrize("row", PATCHES, ids=[row.node for row in PATCHES])
def test_comfyui_patches_on_top(world, row):
    assert_image(sample(cfg_guider(_apg(row.build(world, world.model)), row.positive(world), world.negative, CFG)))
    slg_on_top = cfg_guider(_slg(row.build(world, world.model)), row.positive(world), world.negative, CFG)
    if not row.uses_slot:  # nothing of it in the calc-cond-batch slot for SLG's function to bypass
        assert_image(sample(slg_on_top))
        return
    message = rf"{row.node}: 'SkipLayerGuidanceDiTSimple' replaced .* apply {row.node} last"
    with pytest.raises(RuntimeError, match=message):
        sample(slg_on_top)


@pytest.mark.parametrize("row", PATCHES + TABLE[:1], ids=[row.node for row in PATCHES + TABLE[:1]])
def test_perp_neg_guider(world, row):
    model = row.build(world, world.model) if not row.guider else world.model
    guider = run_node(PerpNegGuider, model, row.positive(world), world.negative, world.negative, CFG, 1.0)[0]
    if not row.uses_slot:
        assert_image(sample(guider))
        return
    with pytest.raises(RuntimeError, match=rf"{row.node}: the guider 'Guider_PerpNeg' evaluates the model without"):
        sample(guider)


# ---------------------------------------------------------------- regressions found in the shared plumbing

def test_a_loaded_calibration_does_not_change_when_its_file_is_rewritten(world, tmp_path):
    """LinearAG Load used to return tensors mapped to the file: rewriting it in place changed (or,
    truncated, crashed) a loaded calibration."""
    from guidance_kit.samplers.linear_ag import Calibration

    path = tmp_path / "c.safetensors"
    world.calibration.save(path)
    loaded = Calibration.load(path)
    kept = loaded.coefficients.clone()
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)  # same size, other coefficients
    path.write_bytes(bytes(data))
    path.write_bytes(b"")
    assert torch.equal(loaded.coefficients, kept)


def test_sub_batched_unconditional_broadcasts_a_mask_like_comfyui(tiny_eps):
    """A batch-2 mask on the negative with a batch-4 latent gives the same images as the mask tiled to 4,
    also on evaluations where only some samples' unconditional rows are evaluated."""
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceGuider
    from guidance_kit.nodes.contract.stats import stats_sink

    mask = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).float()  # 0 = no uncond there
    embedding, extras = tiny_eps.negative[0]

    def run(negative_mask, threshold):
        negative = [[embedding, {**extras, "mask": negative_mask, "mask_strength": 1.0, "set_area_to_bounds": False}]]
        guider = run_node(AdaptiveGuidanceGuider, tiny_eps.patcher, tiny_eps.positive, negative, 5.0,
                                                threshold=threshold, measure="denoised", start_percent=0.0,
                                                end_percent=1.0)[0]
        samples = sample_guider(guider, tiny_eps.empty_latent(batch=4), steps=6, seed=2)
        return samples, stats_sink(guider.model_patcher).last

    _, probe = run(mask.repeat(2, 1, 1), 1.0)
    first = probe.evaluations[0].signals["cosine"]
    threshold = sum(sorted(first)[1:3]) / 2  # the two lowest keep their unconditional one evaluation longer
    kept = sorted(i for i, c in enumerate(first) if c < threshold)
    assert kept != [0, 1], "with these rows a prefix of the mask is right by chance: pick another seed"
    tiled, run_tiled = run(mask.repeat(2, 1, 1), threshold)
    broadcast, _ = run(mask, threshold)
    assert any(4 < e.rows < 8 for e in run_tiled.evaluations), "no evaluation sub-batched the unconditional"
    torch.testing.assert_close(broadcast, tiled, rtol=1e-5, atol=1e-5)


def test_autoguidance_and_gfcg_patches_stack_into_gfcg_with_autoguidance(world):
    """Autoguidance then GFCG (or the reverse) gave GFCG alone (or Autoguidance alone), bit for bit: both are one
    technique class, and the later installation replaced the earlier.  Now either order samples exactly what the
    GFCG node with a weak_model samples."""
    from guidance_kit.nodes import gfcg

    def patched(model, *parts):
        for part in parts:
            model = run_node(gfcg.AutoguidanceModelPatch, model, weak_model=world.weak)[0] if part == "atg" else \
                run_node(gfcg.GFCGModelPatch, model, **_gfcg_options(world, weak=False))[0]
        return sample(cfg_guider(model, world.positive, world.negative, CFG))

    both = sample(cfg_guider(run_node(gfcg.GFCGModelPatch, world.model, **_gfcg_options(world, weak=True) |
                                      {"reference_row": "extra"})[0], world.positive, world.negative, CFG))
    assert not torch.equal(both, patched(world.model, "gfcg"))
    assert not torch.equal(both, patched(world.model, "atg"))
    assert torch.equal(patched(world.model, "atg", "gfcg"), both)
    assert torch.equal(patched(world.model, "gfcg", "atg"), both)


def test_a_bound_method_hook_is_refused_when_installed(world):
    """ModelPatcher.clone deep-copies model_options, and a deep copy of a bound method copies its object: PPAP's
    post-CFG hook (a bound method) turned its weights into inference tensors in every later clone made in the
    server, and the next node's sampling failed with a raw autograd error."""
    from guidance_kit.nodes.contract import Technique, install

    class BoundHook(Technique):
        node = "Bound Hook"

        def hook(self, args):
            return args["denoised"]

        def patch(self, patched, key):
            patched.set_model_sampler_post_cfg_function(self.hook)

    with pytest.raises(TypeError, match="Bound Hook: the hook .*hook is a bound method"):
        install(world.model, BoundHook())
