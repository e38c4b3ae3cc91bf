"""GFCG and Autoguidance on real ComfyUI sampling paths: the toy world and the tiny model families.

Exactness tests replay a recorded run through a reference guider written from the formulas
(``samplers/gfcg.py``, ``samplers/autoguidance.py``) with ComfyUI's own ``calc_cond_batch``.
"""
import zlib

import pytest
import torch

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers

from harness import tiny_models
from harness.executor import run_node
from harness.sampling import cfg_guider, ksample, sample_guider

PROMPT = "a large red circle on the left"


def toy_latent(batch):
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    return run_node(ToyWorldEmptyLatent, batch)[0]


def last_run(guider_or_model):
    from guidance_kit.nodes.contract.stats import stats_sink

    patcher = getattr(guider_or_model, "model_patcher", guider_or_model)
    return stats_sink(patcher).last


def gfcg_guider(toy, cfg=1.5, *, targets="", scale=4.0, confidence=0.9, start_percent=0.0, every=1,
                reference_row="extra", weak=None, model=None, prompt=PROMPT):
    from guidance_kit.nodes.gfcg import GFCGGuider

    options = {"weak_model": weak} if weak is not None else {}
    return run_node(GFCGGuider, model=model or toy.model, positive=toy.encode(prompt), negative=toy.negative,
                              cfg=cfg, classifier=toy.classifier, clip=toy.clip, prompt=prompt,
                              targets=targets, scale=scale, confidence=confidence, start_percent=start_percent,
                              every=every,
                              reference_row=reference_row, **options)[0]


def atg_guider(model, weak, positive, negative, weight):
    from guidance_kit.nodes.gfcg import AutoguidanceGuider

    return run_node(AutoguidanceGuider, model=model, positive=positive, negative=negative, cfg=weight,
                                      weak_model=weak)[0]


# ---------------------------------------------------------------- prompts and targets

def test_targets_come_from_the_prompt_and_variants_replace_one_phrase(toy):
    from guidance_kit.nodes.gfcg import find_targets, replace_phrase

    classifier = toy.classifier
    assert find_targets(PROMPT, classifier, {}, "GFCG") == {"colour": 0, "shape": 0, "position": 0}
    assert find_targets(PROMPT, classifier, {"shape": "circle"}, "GFCG") == {"shape": 0}
    assert replace_phrase(PROMPT, "on the left", "at the top") == "a large red circle at the top"
    assert replace_phrase("a redder red", "red", "blue") == "a redder blue"
    with pytest.raises(ValueError, match="GFCG 'targets': the prompt names several colour classes"):
        find_targets("a red circle left of a blue square", classifier, {}, "GFCG")
    with pytest.raises(ValueError, match="no class of the classifier"):
        find_targets("a mirror", classifier, {}, "GFCG")
    with pytest.raises(ValueError, match="'magenta' is not a class of head 'colour'"):
        gfcg_guider(toy, targets="colour=magenta")


def test_bad_numbers_are_rejected_before_sampling(toy):
    with pytest.raises(ValueError, match="GFCG: 'scale' must be a finite number"):
        gfcg_guider(toy, scale=float("nan"))
    with pytest.raises(ValueError, match="'confidence'"):
        gfcg_guider(toy, confidence=1.5)


# ---------------------------------------------------------------- GFCG on the toy world

class ReplayGFCG(comfy.samplers.CFGGuider):
    """Reference: D = D(∅) + s·(D(c) − D(∅)) + w_i·(D(c) − D(c_ref,i)) per sample i, the reference
    classes and scales w replayed from a recorded GFCG run's signals (all variants evaluated)."""

    def __init__(self, patcher, positive, negative, cfg, variants, recorded):
        super().__init__(patcher)
        self.set_conds(positive, negative)
        self.set_cfg(cfg)
        self.original_conds.update({f"variant{k}": comfy.sampler_helpers.convert_cond(v)
                                    for k, v in enumerate(variants)})
        self.recorded, self.count, self.variants = recorded, 0, len(variants)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI signature)
        lists = [self.conds["positive"], self.conds["negative"]]
        lists += [self.conds[f"variant{k}"] for k in range(self.variants)]
        out = comfy.samplers.calc_cond_batch(self.inner_model, lists, x, timestep, model_options)
        cond, uncond, variants = out[0], out[1], torch.stack(out[2:])
        denoised = uncond + self.cfg * (cond - uncond)
        signals = self.recorded[self.count]
        self.count += 1
        for sample, (k, w) in enumerate(zip(signals.get("reference_class", [None] * len(x)),
                                            signals.get("gfcg_scale", [0.0] * len(x)))):
            if k is not None and w > 0:
                denoised[sample] += w * (cond[sample] - variants[int(k), sample])
        return denoised


def test_gfcg_extra_row_matches_the_formula_and_counts_its_rows(toy):
    guider = gfcg_guider(toy, cfg=1.5, targets="shape=circle", scale=4.0, confidence=1.0)
    out = sample_guider(guider, toy_latent(4), steps=4, scheduler="simple", seed=3)
    run = last_run(guider)
    recorded = [e.signals for e in run.evaluations]
    assert "gfcg_scale" not in recorded[0]  # nothing read yet
    active = [sum(1 for w in s["gfcg_scale"] if w > 0) for s in recorded[1:]]
    assert sum(active) > 0
    assert [e.rows for e in run.evaluations] == [8] + [8 + a for a in active]
    assert run.baseline_rows == 4 * 8
    from guidance_kit.toyworld import scenes
    variants = [toy.encode(PROMPT.replace("circle", shape)) for shape in scenes.SHAPES]
    reference = ReplayGFCG(toy.model, toy.encode(PROMPT), toy.negative, 1.5, variants, recorded)
    expected = sample_guider(reference, toy_latent(4), steps=4, scheduler="simple", seed=3)
    assert torch.allclose(out, expected, atol=1e-4)
    plain = sample_guider(cfg_guider(toy.model, toy.encode(PROMPT), toy.negative, 1.5), toy_latent(4), steps=4,
                          scheduler="simple", seed=3)
    assert (out - plain).abs().max() > 1e-3


def test_confident_classifier_is_plain_cfg(toy):
    latent = toy_latent(2)
    guider = gfcg_guider(toy, cfg=3.0, confidence=0.0)
    out = sample_guider(guider, latent, steps=3, scheduler="simple", seed=1)
    plain = sample_guider(cfg_guider(toy.model, toy.encode(PROMPT), toy.negative, 3.0), latent, steps=3,
                          scheduler="simple", seed=1)
    assert torch.equal(out, plain)
    run = last_run(guider)
    assert run.rows == run.baseline_rows and all(w == 0 for e in run.evaluations[1:] for w in e.signals["gfcg_scale"])


def test_guide_row_mode_costs_what_cfg_costs(toy):
    guider = gfcg_guider(toy, cfg=1.5, reference_row="guide", confidence=1.0)
    sample_guider(guider, toy_latent(4), steps=4, scheduler="simple", seed=3)
    run = last_run(guider)
    assert any(w > 0 for e in run.evaluations[1:] for w in e.signals["gfcg_scale"])
    assert run.rows == run.baseline_rows == 4 * 8
    assert run.events, "reference choices are marked"
    from guidance_kit.samplers.stats_plot import MAX_SIGNAL_PANELS, signal_curves

    curves = signal_curves(run)
    plotted = list(curves)[:MAX_SIGNAL_PANELS]
    assert plotted == ["reference_class", "gfcg_scale", "target_probability"]
    assert all(len(curves[name]) == 4 for name in plotted)  # one curve per sample


def test_no_gfcg_before_the_start_of_its_window(toy):
    guider = gfcg_guider(toy, cfg=1.5, confidence=1.0, start_percent=0.5)
    sample_guider(guider, toy_latent(2), steps=4, scheduler="simple", seed=2)
    run = last_run(guider)  # sigmas 1, 0.75, 0.5, 0.25: GFCG from sigma 0.5 on
    assert ["gfcg_scale" in e.signals for e in run.evaluations] == [False, False, True, True]
    assert [e.rows for e in run.evaluations][:2] == [4, 4]


def test_every_k_evaluations_reuses_the_reading(toy):
    guider = gfcg_guider(toy, cfg=1.5, every=3, confidence=1.0)
    sample_guider(guider, toy_latent(2), steps=7, scheduler="simple", seed=2)
    seconds = [e.signals["classifier_seconds"] for e in last_run(guider).evaluations[1:]]
    readings = [i for i in range(len(seconds)) if i == 0 or seconds[i] > seconds[i - 1]]
    assert readings == [0, 3]


def test_gfcg_at_cfg_one_is_the_conditional_plus_the_contrast(toy):
    guider = gfcg_guider(toy, cfg=1.0, confidence=1.0)
    out = sample_guider(guider, toy_latent(2), steps=3, scheduler="simple", seed=4)
    run = last_run(guider)
    active = [sum(1 for w in e.signals["gfcg_scale"] if w > 0) for e in run.evaluations[1:]]
    assert [e.rows for e in run.evaluations] == [2] + [2 + a for a in active] and sum(active)
    plain = sample_guider(cfg_guider(toy.model, toy.encode(PROMPT), toy.negative, 1.0), toy_latent(2), steps=3,
                          scheduler="simple", seed=4)
    assert (out - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- Autoguidance

class ManualAutoguidance(comfy.samplers.CFGGuider):
    """Reference: D = D_weak(c) + w·(D_main(c) − D_weak(c)) with ComfyUI's calc_cond_batch on both."""

    def __init__(self, patcher, weak, positive, negative, weight):
        super().__init__(patcher)
        self.set_conds(positive, negative)
        self.set_cfg(weight)
        self.weak = weak

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI signature)
        comfy.model_management.load_models_gpu([self.weak])
        self.weak.pre_run()
        main = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["positive"]], x, timestep, model_options)
        weak = comfy.samplers.calc_cond_batch(self.weak.model, [self.conds["positive"]], x, timestep, {})
        return weak[0] + self.cfg * (main[0] - weak[0])


@pytest.fixture(scope="module")
def weak_tiny():
    return {family: tiny_models.build(family, seed=1) for family in tiny_models.FAMILIES}


def test_autoguidance_is_the_weak_to_main_extrapolation_on_every_family(tiny, weak_tiny):
    weak = weak_tiny[tiny.family].patcher
    latent = tiny.empty_latent(batch=2)
    guider = atg_guider(tiny.patcher, weak, tiny.positive, tiny.negative, 2.5)
    out = sample_guider(guider, latent, steps=3, seed=5)
    expected = sample_guider(ManualAutoguidance(tiny.patcher, weak, tiny.positive, tiny.negative, 2.5), latent,
                             steps=3, seed=5)
    assert torch.allclose(out, expected, atol=1e-5)
    plain = sample_guider(cfg_guider(tiny.patcher, tiny.positive, tiny.negative, 2.5), latent, steps=3, seed=5)
    assert (out - plain).abs().max() > 1e-4
    run = last_run(guider)
    assert [e.rows for e in run.evaluations] == [4] * 3  # 2 main (cond) + 2 weak per evaluation


def test_autoguidance_patch_with_ksampler(tiny_eps, weak_tiny):
    from guidance_kit.nodes.gfcg import AutoguidanceModelPatch

    patched = run_node(AutoguidanceModelPatch, tiny_eps.patcher, weak_tiny["sd15_eps"].patcher)[0]
    latent = tiny_eps.empty_latent(batch=1)
    out = ksample(patched, tiny_eps.positive, tiny_eps.negative, latent, cfg=2.0, steps=3, seed=1)
    expected = sample_guider(ManualAutoguidance(tiny_eps.patcher, weak_tiny["sd15_eps"].patcher, tiny_eps.positive,
                                                tiny_eps.negative, 2.0), latent, steps=3, seed=1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_weak_model_must_be_a_separate_network_of_the_family(tiny_eps, weak_tiny):
    with pytest.raises(ValueError, match="Autoguidance: 'weak_model': it shares its network"):
        atg_guider(tiny_eps.patcher, tiny_eps.patcher.clone(), tiny_eps.positive, tiny_eps.negative, 2.0)
    with pytest.raises(ValueError, match="cannot guide"):
        atg_guider(tiny_eps.patcher, weak_tiny["sd3_flow"].patcher, tiny_eps.positive, tiny_eps.negative, 2.0)


# ---------------------------------------------------------------- GFCG (+ Autoguidance) on every family

class TextConditioning:
    """A stand-in CLIP for a tiny family: conditioning of the family's shapes, a function of the text."""

    def __init__(self, tiny):
        self.template = tiny.positive[0]

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        tensor, extras = self.template
        extras = {key: torch.randn(value.shape, generator=generator) if isinstance(value, torch.Tensor) else value
                  for key, value in extras.items()}
        return [[torch.randn(tensor.shape, generator=generator), extras]]


@pytest.mark.parametrize("reference_row", ["extra", "guide"])
def test_gfcg_and_autoguidance_on_every_family(tiny, weak_tiny, toy, reference_row):
    from guidance_kit.nodes.gfcg import GFCGModelPatch

    clip = TextConditioning(tiny)
    positive = clip.encode_from_tokens_scheduled(PROMPT)
    classifier = toy.classifier.with_pixel_source("latent_rgb")
    for weak in (None, weak_tiny[tiny.family].patcher):
        options = {} if weak is None else {"weak_model": weak}
        patched = run_node(GFCGModelPatch, tiny.patcher, classifier, clip, PROMPT, "colour=red", 3.0, 1.0, 0.0,
                                         1, reference_row, **options)[0]
        out = ksample(patched, positive, tiny.negative, tiny.empty_latent(batch=2), cfg=2.0, steps=3, seed=2)
        assert torch.isfinite(out).all()
        run = last_run(patched)
        active = [sum(1 for w in e.signals["gfcg_scale"] if w > 0) for e in run.evaluations[1:]]
        assert sum(active) > 0
        extra = active if reference_row == "extra" else [0] * len(active)
        assert [e.rows for e in run.evaluations] == [4] + [4 + a for a in extra]
