"""The technique contract, table-driven: one row per technique node (a new node is one row).

Every row is checked for: the input MODEL untouched; fresh state every run (runs of other lengths in
between change nothing); a foreign hook in every slot still runs; stacking with every other pack
patch in both orders gives a defined result; ComfyUI's own SkipLayerGuidanceDiTSimple,
PerpNegGuider and APG either work with it or raise an error naming both nodes.  All on the toy
world's DiT (it honours ComfyUI's ``patches_replace`` block patches like Flux's single blocks).
"""
import copy
import itertools
import re

import pytest
import torch
from technique_table import (
    CFG,
    PATCHES,
    STEPS,
    TABLE,
    _gfcg_options,
    assert_image,
    guider_of,
    ids,
    sample,
    technique_of,
)

import comfy.samplers
from comfy.patcher_extension import WrappersMP
from comfy_extras.nodes_apg import APG
from comfy_extras.nodes_perpneg import PerpNegGuider
from comfy_extras.nodes_slg import SkipLayerGuidanceDiTSimple

from harness.executor import run_node
from harness.sampling import cfg_guider, sample_guider


def snapshot(model):
    return (copy.copy(model.model_options), {k: {n: list(v) for n, v in w.items()} for k, w in model.wrappers.items()},
            dict(model.attachments), dict(model.callbacks), copy.copy(model.model_options.get("transformer_options")))


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_input_model_untouched(toy, row):
    before = snapshot(toy.model)
    sample(guider_of(row, toy, toy.model))
    assert snapshot(toy.model) == before


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_fresh_state_every_run(toy, row):
    guider = guider_of(row, toy, toy.model)
    first, longer, again = sample(guider, STEPS), sample(guider, STEPS + 2), sample(guider, STEPS)
    assert torch.equal(first, again)
    assert torch.equal(first, sample(guider_of(row, toy, toy.model), STEPS))
    assert torch.equal(longer, sample(guider_of(row, toy, toy.model), STEPS + 2))


@pytest.mark.parametrize("row", TABLE, ids=ids)
def test_foreign_hooks_in_every_slot_still_run(toy, row):
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

    model = toy.model.clone()
    model.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    model.set_model_unet_function_wrapper(unet_wrapper)
    model.set_model_sampler_post_cfg_function(post_cfg)
    model.set_model_patch_replace(block, "dit", "single_block", 3)
    slots = (WrappersMP.OUTER_SAMPLE, WrappersMP.PREDICT_NOISE, WrappersMP.CALC_COND_BATCH, WrappersMP.APPLY_MODEL,
             WrappersMP.DIFFUSION_MODEL)
    for slot in slots:
        model.add_wrapper_with_key(slot, "test.foreign", wrapper(slot))
    assert_image(sample(guider_of(row, toy, model)))
    expected = {*slots, "calc_cond_batch_function", "model_function_wrapper", "post_cfg_function", "block_replace"}
    assert set(calls) == expected


PAIRS = list(itertools.product(PATCHES, TABLE))


@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a.node} then {b.node}" for a, b in PAIRS])
def test_every_pair_of_pack_nodes_stacks(toy, first, second):
    """A patch under every node of the pack (itself included): both act (their run record says so), or a clear
    error naming both.  This crashed for Adaptive Guidance under Composable (a chained function was handed
    n + 1 cond lists), and dropped Autoguidance under GFCG and AG/LinearAG under Autoguidance silently."""
    from guidance_kit.nodes.contract.stats import stats_sink

    stacked = first.build(toy, toy.model)
    guider = second.build(toy, stacked) if second.guider else \
        cfg_guider(second.build(toy, stacked), (first.composes or second.composes) and toy.composition
                   or toy.positive, toy.negative, CFG)
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
def test_over_comfyui_patches(toy, row, comfy_patch):
    assert_image(sample(guider_of(row, toy, comfy_patch(toy.model))))


@pytest.mark.parametrize("row", PATCHES, ids=[row.node for row in PATCHES])
def test_comfyui_patches_on_top(toy, row):
    assert_image(sample(cfg_guider(_apg(row.build(toy, toy.model)), row.positive(toy), toy.negative, CFG)))
    slg_on_top = cfg_guider(_slg(row.build(toy, toy.model)), row.positive(toy), toy.negative, CFG)
    if not row.uses_slot:  # nothing of it in the calc-cond-batch slot for SLG's function to bypass
        assert_image(sample(slg_on_top))
        return
    node = re.escape(row.node)  # display names may hold regex characters: "Adaptive Guidance (learned)"
    message = rf"{node}: 'SkipLayerGuidanceDiTSimple' replaced .* apply {node} last"
    with pytest.raises(RuntimeError, match=message):
        sample(slg_on_top)


@pytest.mark.parametrize("row", PATCHES + TABLE[:1], ids=[row.node for row in PATCHES + TABLE[:1]])
def test_perp_neg_guider(toy, row):
    model = row.build(toy, toy.model) if not row.guider else toy.model
    guider = run_node(PerpNegGuider, model, row.positive(toy), toy.negative, toy.negative, CFG, 1.0)[0]
    if not row.uses_slot:
        assert_image(sample(guider))
        return
    with pytest.raises(RuntimeError,
                       match=rf"{re.escape(row.node)}: the guider 'Guider_PerpNeg' evaluates the model without"):
        sample(guider)


# ---------------------------------------------------------------- regressions found in the shared plumbing

def test_a_loaded_calibration_does_not_change_when_its_file_is_rewritten(toy, tmp_path):
    """LinearAG Load used to return tensors mapped to the file: rewriting it in place changed (or,
    truncated, crashed) a loaded calibration."""
    from guidance_kit.samplers.linear_ag import Calibration

    path = tmp_path / "c.safetensors"
    toy.calibration.save(path)
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


def test_autoguidance_and_gfcg_patches_stack_into_gfcg_with_autoguidance(toy):
    """Autoguidance then GFCG (or the reverse) gave GFCG alone (or Autoguidance alone), bit for bit: both are one
    technique class, and the later installation replaced the earlier.  Now either order samples exactly what the
    GFCG node with a weak_model samples."""
    from guidance_kit.nodes import gfcg

    def patched(model, *parts):
        for part in parts:
            model = run_node(gfcg.AutoguidanceModelPatch, model, weak_model=toy.weak)[0] if part == "atg" else \
                run_node(gfcg.GFCGModelPatch, model, **_gfcg_options(toy, weak=False))[0]
        return sample(cfg_guider(model, toy.positive, toy.negative, CFG))

    both = sample(cfg_guider(run_node(gfcg.GFCGModelPatch, toy.model, **_gfcg_options(toy, weak=True) |
                                      {"reference_row": "extra"})[0], toy.positive, toy.negative, CFG))
    assert not torch.equal(both, patched(toy.model, "gfcg"))
    assert not torch.equal(both, patched(toy.model, "atg"))
    assert torch.equal(patched(toy.model, "atg", "gfcg"), both)
    assert torch.equal(patched(toy.model, "gfcg", "atg"), both)


def test_a_bound_method_hook_is_refused_when_installed(toy):
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
        install(toy.model, BoundHook())
