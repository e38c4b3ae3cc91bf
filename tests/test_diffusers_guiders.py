"""The diffusers guiders (diffusers_guiders/): each guider against its samplers/ function, and end to end
through a tiny Modular SDXL pipeline with a UNet-call counter.  Offline: nothing is downloaded."""
import copy
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402

from guidance_kit.diffusers_guiders import (  # noqa: E402
    GFCG,
    PPAP,
    AdaptiveGuidance,
    Autoguidance,
    ComposableGuidance,
    LinearAG,
    StepSample,
    calibrate_linear_ag,
    show_latents,
)
from guidance_kit.diffusers_guiders.latents import SeesLatents, prediction_type, sigma_at  # noqa: E402
from guidance_kit.samplers import adaptive_guidance as ag  # noqa: E402
from guidance_kit.samplers import gfcg, ppap  # noqa: E402
from guidance_kit.samplers import linear_ag as lag  # noqa: E402
from guidance_kit.samplers.autoguidance import autoguide  # noqa: E402
from guidance_kit.samplers.composable import compose  # noqa: E402
from guidance_kit.samplers.similarity import per_sample_cosine  # noqa: E402
from harness import tiny_diffusers as td  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEPS, SCALE = 4, 5.0


@pytest.fixture(scope="module")
def pipe():
    pipe = td.tiny_sdxl_pipeline(seed=0)
    pipe.counter = td.CallCounter().attach(pipe.unet)
    return pipe


@pytest.fixture(scope="module")
def inputs():
    return td.prompt_inputs(0)


def run(pipe, guider, inputs, steps=STEPS):
    """(final latents, real UNet evaluations) of one call with ``guider``."""
    pipe.update_components(guider=guider)
    pipe.counter.calls = 0
    return td.generate(pipe, inputs, steps), pipe.counter.calls


@pytest.fixture(scope="module")
def cfg_run(pipe, inputs):
    return run(pipe, ClassifierFreeGuidance(guidance_scale=SCALE), inputs)


def step(guider, index, steps=STEPS, timestep=None):
    guider.set_state(index, steps, torch.tensor(1000.0 - index if timestep is None else timestep))


# Adaptive Guidance

def test_ag_at_threshold_one_is_classifier_free_guidance(pipe, inputs, cfg_run):
    latents, calls = run(pipe, AdaptiveGuidance(guidance_scale=SCALE, threshold=1.0), inputs)
    assert calls == cfg_run[1] == 2 * STEPS
    assert torch.equal(latents, cfg_run[0])


@pytest.mark.parametrize("threshold", [0.0, 0.9])
def test_ag_skips_the_unconditional_passes_its_switch_log_says(pipe, inputs, cfg_run, threshold):
    guider = AdaptiveGuidance(guidance_scale=SCALE, threshold=threshold)
    latents, calls = run(pipe, guider, inputs)
    assert guider.switch_log, "the sample never switched: the test would not exercise a skip"
    assert calls == td.calls_from_switch_log(guider.switch_log, STEPS) < 2 * STEPS
    assert not torch.allclose(latents, cfg_run[0])
    again, calls_again = run(pipe, guider, inputs)  # fresh state at step 0: the same run again
    assert calls_again == calls and torch.equal(again, latents)


def test_ag_per_sample_rule_and_batch_level_skip():
    guider = AdaptiveGuidance(guidance_scale=SCALE, threshold=0.95)
    cond = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    near = cond + 0.01 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    far = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    uncond = torch.stack([near[0], far[1]])  # sample 0 agrees with its conditional, sample 1 does not
    cfg = ClassifierFreeGuidance(guidance_scale=SCALE).forward(cond, uncond).pred

    step(guider, 0)
    assert guider.num_conditions == 2
    out = guider.forward(cond, uncond).pred
    assert torch.equal(out, cfg)  # the sample switching now keeps CFG at this step
    gamma = ag.similarity("guidance", None, cond, uncond, cfg_scale=SCALE)
    assert guider.switch_log == [{"step": 0, "samples": [0], "cosine": [pytest.approx(float(gamma[0]))]}]

    step(guider, 1)
    assert guider.num_conditions == 2  # sample 1 still needs its unconditional
    out = guider.forward(cond, uncond).pred
    assert torch.equal(out[0], cond[0]) and torch.equal(out[1], cfg[1])

    step(guider, 2)
    guider.forward(cond, torch.stack([near[0], near[1]]))  # now sample 1 switches too
    step(guider, 3)
    assert guider.num_conditions == 1
    assert torch.equal(guider.forward(cond).pred, cond)

    step(guider, 0)  # a new run
    assert guider.num_conditions == 2 and guider.switch_log == []


def test_ag_skip_rows_evaluates_the_unswitched_samples_only(pipe):
    """Batch of 2 whose samples switch at different steps: with ``skip_rows`` the unconditional pass runs on the
    rows that still need it (one row per sample and step, plus one per step up to each sample's switch)."""
    inputs, rows = td.prompt_inputs(0, batch=2), {"count": 0}
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: rows.update(count=rows["count"] +
                                                                                           len(args[0])))
    steps, results = 8, {}
    try:
        for skip_rows in (False, True):
            guider = AdaptiveGuidance(guidance_scale=SCALE, threshold=0.9, skip_rows=skip_rows)
            rows["count"] = 0
            results[skip_rows] = run(pipe, guider, inputs, steps=steps)[0], rows["count"], guider.switch_log
    finally:
        handle.remove()
    switch_steps = {sample: entry["step"] for entry in results[True][2] for sample in entry["samples"]}
    assert len(set(switch_steps.values())) == 2, "the samples must switch at different steps for this test"
    assert results[True][1] == sum(steps + step + 1 for step in switch_steps.values())
    assert results[False][1] == 2 * steps + 2 * (max(switch_steps.values()) + 1) > results[True][1]
    assert torch.allclose(results[True][0], results[False][0], atol=1e-5)
    assert pipe.unet._diffusers_hook.hooks == {}


def test_ag_prediction_quantity_is_the_cosine_of_the_model_outputs():
    guider = AdaptiveGuidance(guidance_scale=SCALE, threshold=0.0, quantity="prediction")
    cond, uncond = torch.randn(2, 1, 4, 4, 4).unbind(0)
    step(guider, 0)
    guider.forward(cond, uncond)
    assert guider.switch_log[0]["cosine"] == [pytest.approx(float(per_sample_cosine(cond, uncond)[0]))]


def test_ag_rejects_bad_settings():
    with pytest.raises(ValueError, match="quantity"):
        AdaptiveGuidance(quantity="noise")
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveGuidance(threshold=1.5)
    with pytest.raises(ValueError, match="switch_start"):
        AdaptiveGuidance(switch_start=0.8, switch_end=0.2)


# Composable

def test_composable_with_one_concept_is_classifier_free_guidance(pipe, inputs, cfg_run):
    latents, calls = run(pipe, ComposableGuidance(weights=[SCALE]), inputs)
    assert calls == 2 * STEPS
    assert torch.allclose(latents, cfg_run[0], atol=1e-5)


def test_composable_evaluates_every_concept_and_composes_them(pipe, inputs, cfg_run):
    guider = ComposableGuidance(weights=[SCALE, -2.0], concepts=[td.concept_inputs(3)])
    latents, calls = run(pipe, guider, inputs)
    assert calls == 3 * STEPS
    assert not torch.allclose(latents, cfg_run[0], atol=1e-3)
    u, c0, c1 = torch.randn(3, 1, 4, 8, 8).unbind(0)
    out = guider.forward(pred_uncond=u, pred_concept_0=c0, pred_concept_1=c1).pred
    assert torch.equal(out, compose(u, [c0, c1], [SCALE, -2.0]))


def test_composable_errors_name_the_guider_and_the_input(pipe, inputs):
    with pytest.raises(ValueError, match="ComposableGuidance: 2 weights need 1 concepts"):
        ComposableGuidance(weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="ComposableGuidance: every concept weight is 0"):
        ComposableGuidance(weights=[0.0])
    with pytest.raises(ValueError, match=r"ComposableGuidance: concept inputs \['pooled'\]"):
        run(pipe, ComposableGuidance(weights=[SCALE, 1.0], concepts=[{"pooled": torch.zeros(1, 32)}]), inputs)


# Autoguidance

def test_autoguidance_runs_the_weak_model_for_the_guide_pass(pipe, inputs):
    weak = td.tiny_unet(seed=7, width=16)
    weak_counter = td.CallCounter().attach(weak)
    latents, calls = run(pipe, Autoguidance(weak_model=weak, guidance_scale=2.0), inputs)
    assert calls == STEPS and weak_counter.calls == STEPS
    assert pipe.unet._diffusers_hook.hooks == {}  # the hook is gone after each guide pass
    plain, _ = run(pipe, ClassifierFreeGuidance(guidance_scale=1.0), inputs)
    assert not torch.allclose(latents, plain, atol=1e-3)
    main, weak_pred = torch.randn(2, 1, 4, 8, 8).unbind(0)
    guider = Autoguidance(weak_model=weak, guidance_scale=2.0)
    assert torch.equal(guider.forward(main, weak_pred).pred, autoguide(main, weak_pred, 2.0))


def test_autoguidance_with_an_identical_guide_is_the_conditional_alone(pipe, inputs):
    twin = copy.deepcopy(pipe.unet)
    latents, _ = run(pipe, Autoguidance(weak_model=twin, guidance_scale=2.0), inputs)
    plain, _ = run(pipe, ClassifierFreeGuidance(guidance_scale=1.0), inputs)
    assert torch.allclose(latents, plain, atol=1e-5)


def test_autoguidance_refuses_the_denoiser_as_its_own_guide(pipe, inputs):
    with pytest.raises(ValueError, match="Autoguidance: weak_model is the denoiser itself"):
        run(pipe, Autoguidance(weak_model=pipe.unet), inputs)
    pipe.unet._diffusers_hook.hooks.clear()


# LinearAG

@pytest.fixture(scope="module")
def calibration_file(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("linear_ag") / "tiny_sdxl.safetensors"
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=SCALE))
    calibrate_linear_ag(pipe, [td.prompt_inputs(seed) for seed in (1, 2, 3)], path, num_inference_steps=STEPS,
                        guidance_scale=SCALE, height=td.HEIGHT, width=td.WIDTH)
    assert isinstance(pipe.guider, ClassifierFreeGuidance) and not isinstance(pipe.guider, LinearAG)
    return path


def test_calibration_is_the_nodes_file_format(calibration_file):
    calibration = lag.Calibration.load(calibration_file)
    assert calibration.coefficients.shape == (STEPS, STEPS, 4, len(lag.TERMS))
    assert calibration.info["prediction_space"] == "model_output" and calibration.info["steps"] == STEPS
    assert calibration.negative_fingerprint.numel() == td.TEXT_TOKENS * td.TEXT_WIDTH


def test_linear_ag_follows_its_step_pattern(pipe, inputs, cfg_run, calibration_file):
    guider = LinearAG(calibration=str(calibration_file), guidance_scale=SCALE, true_every=2, guided_until=0.5)
    assert guider._pattern == [lag.TRUE, lag.REGRESSED, lag.CONDITIONAL, lag.CONDITIONAL]
    latents, calls = run(pipe, guider, inputs)
    assert calls == 2 + 1 + 1 + 1
    assert not torch.allclose(latents, cfg_run[0], atol=1e-4)


def test_linear_ag_regressed_step_is_the_samplers_regression(calibration_file):
    guider = LinearAG(calibration=str(calibration_file), guidance_scale=SCALE)
    calibration = lag.Calibration.load(calibration_file)
    timesteps = calibration.info["timesteps"]
    c0, u0, c1 = torch.randn(3, 1, 4, 8, 8).unbind(0)
    step(guider, 0, timestep=timesteps[0])
    assert guider.num_conditions == 2
    guider.forward(c0, u0)
    step(guider, 1, timestep=timesteps[1])
    assert guider.num_conditions == 1
    regressed = lag.predict_uncond(calibration.coefficients[0, 1], [c1, c0, u0])
    expected = ClassifierFreeGuidance(guidance_scale=SCALE).forward(c1, regressed).pred
    assert torch.allclose(guider.forward(c1).pred, expected)
    step(guider, 2, timestep=timesteps[2])
    assert guider.num_conditions == 1 and torch.equal(guider.forward(c1).pred, c1)


def test_linear_ag_mismatch_warns_and_samples_with_true_cfg(pipe, inputs, calibration_file, caplog):
    with caplog.at_level(logging.WARNING):
        _, calls = run(pipe, LinearAG(calibration=str(calibration_file), guidance_scale=SCALE), inputs, steps=5)
    assert calls == 2 * 5
    assert any("5 steps, calibrated 4" in record.getMessage() for record in caplog.records)


def test_linear_ag_with_another_negative_warns_and_samples_with_true_cfg(pipe, calibration_file, caplog):
    with caplog.at_level(logging.WARNING):
        _, calls = run(pipe, LinearAG(calibration=str(calibration_file), guidance_scale=SCALE),
                       td.prompt_inputs(0, negative_seed=5))
    assert calls == 2 * STEPS
    assert any("negative prompt differs" in record.getMessage() for record in caplog.records)


def test_calibration_refuses_runs_with_different_negatives(pipe, tmp_path):
    with pytest.raises(ValueError, match="every run needs the same negative prompt"):
        calibrate_linear_ag(pipe, [td.prompt_inputs(1), td.prompt_inputs(2, negative_seed=5)],
                            tmp_path / "mixed.safetensors", num_inference_steps=2, guidance_scale=SCALE,
                            height=td.HEIGHT, width=td.WIDTH)


@pytest.fixture(scope="module")
def shown_pipe():
    """The tiny pipeline built with ``show_latents``: the guider is handed each step's latents and sigma."""
    pipe = td.tiny_sdxl_pipeline(seed=0, latents_to_guider=True)
    pipe.counter = td.CallCounter().attach(pipe.unet)
    return pipe


class DenoisedRecorder(SeesLatents, ClassifierFreeGuidance):
    """CFG that records what the ComfyUI calibration node records per evaluation: x, D_c, D_u and sigma."""

    def forward(self, pred_cond, pred_uncond=None):
        sample = self.take_sample("DenoisedRecorder")
        self.trajectory.append((sample.latents, sample.denoised(pred_cond), sample.denoised(pred_uncond),
                                sample.sigma))
        return super().forward(pred_cond, pred_uncond)


@pytest.fixture(scope="module")
def comfyui_calibration_file(shown_pipe, tmp_path_factory):
    """A calibration written the way nodes/linear_ag.py's ``calibrate`` writes it (samplers.linear_ag's fit on
    x, D_c, D_u per evaluation; the sigmas; node metadata, no prediction_space), on the tiny pipeline."""
    recorder = DenoisedRecorder(guidance_scale=SCALE)
    fit = lag.LeastSquaresFit(STEPS, 4, lag.TERMS)
    for seed in (1, 2, 3):
        recorder.trajectory = []
        run(shown_pipe, recorder, td.prompt_inputs(seed))
        xs, conds, unconds, sigmas = zip(*recorder.trajectory)
        fit.add_trajectory(list(xs), list(conds), list(unconds))
    schedule = shown_pipe.scheduler.sigmas.float().clone()
    info = {"model": "SDXL:tiny", "model_type": "EPS", "sampler": "euler", "sampler_function": "sample_euler",
            "scheduler": "simple", "steps": STEPS, "cfg": SCALE, "negative_prompt": "", "terms": list(lag.TERMS)}
    negative = lag.conditioning_fingerprint([td.prompt_inputs(0)["negative_prompt_embeds"]])
    path = tmp_path_factory.mktemp("comfyui") / "tiny_sdxl_euler_simple_4_cfg5.safetensors"
    lag.Calibration(fit.solve(), torch.tensor(sigmas), schedule, negative, info).save(path)
    return path


def test_linear_ag_runs_a_comfyui_calibration_on_denoised_predictions(shown_pipe, pipe, inputs, cfg_run,
                                                                     comfyui_calibration_file):
    guider = LinearAG(calibration=str(comfyui_calibration_file), guidance_scale=SCALE)
    latents, calls = run(shown_pipe, guider, inputs)
    assert calls == 2 + 1 + 1 + 1 and guider._problem is None
    assert not torch.allclose(latents, cfg_run[0], atol=1e-4)
    with pytest.raises(ValueError, match=r"LinearAG \(diffusers\) with a ComfyUI calibration: needs each step's "
                                         "latents and sigma.*show_latents"):
        run(pipe, LinearAG(calibration=str(comfyui_calibration_file), guidance_scale=SCALE), inputs)
    assert pipe.counter.calls == 0  # refused before any model call


def test_linear_ag_comfyui_regressed_step_is_the_nodes_regression_on_denoised(comfyui_calibration_file, tmp_path):
    """The regressed step's output, seen as x̂₀, is what the nodes compute: û = predict_uncond on the denoised
    terms (a latent term too), combined by CFG on denoised predictions."""
    calibration = lag.Calibration.load(comfyui_calibration_file)
    terms = ("cond", "x", "anchor_uncond")
    coefficients = torch.randn(STEPS, STEPS, 4, len(terms), generator=torch.Generator().manual_seed(4))
    path = tmp_path / "with_x.safetensors"
    lag.Calibration(coefficients, calibration.evaluation_sigmas, calibration.schedule,
                    calibration.negative_fingerprint, {**calibration.info, "terms": list(terms)}).save(path)
    guider = LinearAG(calibration=str(path), guidance_scale=SCALE)
    sigmas = [float(sigma) for sigma in calibration.evaluation_sigmas]
    x0, c0, u0, x1, c1 = torch.randn(5, 1, 4, 8, 8).unbind(0)
    guider.observe_sample(StepSample(x0, sigmas[0], "epsilon"))
    step(guider, 0)
    assert guider.num_conditions == 2
    guider.forward(c0, u0)
    guider.observe_sample(StepSample(x1, sigmas[1], "epsilon"))
    step(guider, 1)
    assert guider.num_conditions == 1
    out = guider.forward(c1).pred
    denoised_cond, denoised_anchor_uncond = x1 - sigmas[1] * c1, x0 - sigmas[0] * u0
    regressed = lag.predict_uncond(coefficients[0, 1], [denoised_cond, x1, denoised_anchor_uncond])
    nodes_result = regressed + SCALE * (denoised_cond - regressed)  # ComfyUI's cfg combine on denoised
    assert torch.allclose(x1 - sigmas[1] * out, nodes_result, atol=1e-4)
    guider.observe_sample(StepSample(x1, sigmas[2] * 1.01, "epsilon"))
    step(guider, 2)  # another sigma than the calibrated one: warned, true CFG
    assert "sigma" in guider._problem and guider.num_conditions == 2


def test_linear_ag_runs_the_shipped_toy_calibration_of_the_comfyui_nodes():
    """toyworld/calibrations/ was written by the LinearAG Calibrate node (FLOW model, denoised predictions); in
    the toy example loop it follows its pattern and stays near CFG (nearer than the conditional alone)."""
    import importlib.util

    from guidance_kit.toyworld import scenes, weights

    spec = importlib.util.spec_from_file_location("toy_diffusers_guiders",
                                                  REPO / "scripts" / "toy_diffusers_guiders.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    dit, text_encoder = weights.load_main()
    calls = td.CallCounter()
    dit.patch_embed.register_forward_pre_hook(lambda module, args: setattr(calls, "calls", calls.calls + 1))
    cond = text_encoder(torch.tensor([scenes.tokenize(scenes.dev_prompts()[0][0])]))
    uncond = text_encoder(torch.tensor([scenes.tokenize("")]))
    path = str(REPO / "toyworld" / "calibrations" / "toy_dit_euler_simple_20_cfg4.safetensors")
    assert "prediction_space" not in lag.Calibration.load(path).info
    samples = {}
    for name, guider in {"cfg": ClassifierFreeGuidance(guidance_scale=4.0),
                         "regressed": LinearAG(calibration=path, guidance_scale=4.0),
                         "conditional": LinearAG(calibration=path, guidance_scale=4.0, guided_until=0.0)}.items():
        calls.calls = 0
        samples[name] = example.denoise(guider, dit, cond, uncond, steps=20, seed=0)
        assert getattr(guider, "_problem", None) is None
        assert calls.calls == {"cfg": 40, "regressed": 25, "conditional": 20}[name]
    error = {name: float((samples[name] - samples["cfg"]).pow(2).mean()) for name in ("regressed", "conditional")}
    assert 0 < error["regressed"] < 0.25 * error["conditional"]


# GFCG

class FixedClassifier:
    """Per-head probabilities fixed by the test; records the clean estimates it is handed."""

    def __init__(self, probabilities: torch.Tensor):
        self.probabilities, self.read = probabilities, []

    def __call__(self, clean_estimates: torch.Tensor) -> dict:
        self.read.append(clean_estimates)
        return {"colour": self.probabilities[:len(clean_estimates)]}


def gfcg_guider(probabilities, **settings) -> GFCG:
    references = {"colour": [None, td.concept_inputs(3), td.concept_inputs(4)]}
    return GFCG(classifier=FixedClassifier(probabilities), references=references, targets={"colour": 0},
                guidance_scale=SCALE, **settings)


# sample 0 drifts to class 1 (confusion 0.7 / 0.9), sample 1 is sure of its target (no reference pass)
PROBABILITIES = torch.tensor([[0.2, 0.7, 0.1], [0.95, 0.03, 0.02]])


def test_gfcg_reads_the_previous_clean_estimate_and_guides_from_the_reference():
    guider = gfcg_guider(PROBABILITIES, max_scale=2.0, confidence=0.9)
    x0, c0, u0, x1, c1, u1, r1 = torch.randn(7, 2, 4, 8, 8).unbind(0)
    guider.observe_sample(StepSample(x0, 3.0, "epsilon"))
    step(guider, 0)
    assert guider.num_conditions == 2  # no clean estimate yet
    cfg0 = guider.forward(c0, u0).pred
    guider.observe_sample(StepSample(x1, 2.0, "epsilon"))
    step(guider, 1)
    assert guider.num_conditions == 3
    assert torch.allclose(guider.classifier.read[0], x0 - 3.0 * cfg0)  # the guided x̂₀ of step 0
    reference = gfcg.choose_reference({"colour": PROBABILITIES}, {"colour": 0}, 2.0, 0.9)
    assert reference.scale[1] == 0 and reference.scale[0] == pytest.approx(2.0 * 0.7 / 0.9)
    out = guider.forward(c1, u1, r1).pred
    cfg1 = ClassifierFreeGuidance(guidance_scale=SCALE).forward(c1, u1).pred
    assert torch.allclose(out, gfcg.guide(cfg1, c1, r1, reference.scale))
    assert torch.equal(out[1], cfg1[1])
    assert guider.reading_log == [{"step": 1, "scale": reference.scale.tolist(),
                                   "reference": [("colour", 1), None]}]
    guider.observe_sample(StepSample(x0, 3.0, "epsilon"))
    step(guider, 0)  # a new run
    assert guider.reading_log == [] and guider._previous_denoised is None and guider.num_conditions == 2


def test_gfcg_reference_pass_carries_each_active_samples_reference_prompt():
    guider = gfcg_guider(PROBABILITIES)
    guider._reference = gfcg.choose_reference({"colour": PROBABILITIES}, {"colour": 0}, 2.0, 0.9)
    inputs = td.prompt_inputs(0, batch=2)
    data = {"prompt_embeds": (inputs["prompt_embeds"], inputs["negative_prompt_embeds"]),
            "text_embeds": (inputs["pooled_prompt_embeds"], inputs["negative_pooled_prompt_embeds"])}
    batches = guider.prepare_inputs(data)
    assert [batch.__guidance_identifier__ for batch in batches] == ["pred_cond", "pred_uncond", "pred_reference"]
    reference = td.concept_inputs(3)  # class 1, sample 0's reference
    assert torch.equal(batches[2].prompt_embeds[0], reference["prompt_embeds"][0])
    assert torch.equal(batches[2].text_embeds[0], reference["text_embeds"][0])
    assert torch.equal(batches[2].prompt_embeds[1], inputs["prompt_embeds"][1])  # sample 1: its own prompt
    assert torch.equal(batches[0].prompt_embeds, inputs["prompt_embeds"])  # the conditional batch is untouched


def test_gfcg_end_to_end_adds_a_reference_pass_after_the_first_step(shown_pipe, inputs, cfg_run):
    latents, calls = run(shown_pipe, gfcg_guider(PROBABILITIES), inputs)
    assert calls == 2 + 3 * (STEPS - 1)
    assert not torch.allclose(latents, cfg_run[0], atol=1e-4)
    sure, calls = run(shown_pipe, gfcg_guider(torch.tensor([[0.95, 0.03, 0.02]])), inputs)
    assert calls == 2 * STEPS and torch.allclose(sure, cfg_run[0], atol=1e-5)  # confident: exactly CFG
    window = gfcg_guider(PROBABILITIES, start_sigma=0.5)  # the tiny scheduler's sigmas: 4.1, 1.6, 0.7, 0.04
    _, calls = run(shown_pipe, window, inputs)
    assert calls == 2 * 3 + 3 and [entry["step"] for entry in window.reading_log] == [3]


def test_gfcg_errors_name_the_guider_and_the_input(pipe, inputs):
    with pytest.raises(ValueError, match=r"GFCG \(diffusers\): 'targets' and 'references' need the same heads"):
        GFCG(classifier=FixedClassifier(PROBABILITIES), references={"colour": [None]}, targets={"shape": 0})
    with pytest.raises(ValueError, match=r"GFCG \(diffusers\): 'classifier' must be a callable"):
        GFCG(classifier=None, references={"colour": [None]}, targets={"colour": 0})
    with pytest.raises(ValueError, match=r"GFCG \(diffusers\): needs each step's latents and sigma"):
        run(pipe, gfcg_guider(PROBABILITIES), inputs)
    assert pipe.counter.calls == 0


# PPAP

def squashed_model_input(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A ``read_pixels`` that uses σ: tanh of the UNet's input x/√(σ²+1)."""
    return torch.tanh(latents / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5)


# x = α·x0 + σ_t·n of the scheduler's latents, written out: eps and v (1, σ), flow (1 − σ, σ)
FORWARD = {"epsilon": lambda sigma: (1.0, sigma), "v_prediction": lambda sigma: (1.0, sigma),
           "flow": lambda sigma: (1.0 - sigma, sigma)}


@pytest.mark.parametrize("prediction,sigma,expert", [("epsilon", 2.0, 1), ("v_prediction", 0.5, 0), ("flow", 0.7, 0)])
def test_ppap_forward_is_the_samplers_guided_denoised(prediction, sigma, expert):
    experts = td.tiny_experts()
    guider = PPAP(experts=experts, read_pixels=squashed_model_input, head="colour", target=1, scale=3.0,
                  guidance_scale=SCALE)
    x, c, u = torch.randn(3, 2, 4, 8, 8, generator=torch.Generator().manual_seed(5)).unbind(0)
    sample = StepSample(x, sigma, prediction)
    guider.observe_sample(sample)
    step(guider, 0)
    assert guider.num_conditions == 2
    with torch.no_grad():  # as the pipeline runs the guider
        out = guider.forward(c, u).pred
    cfg = ClassifierFreeGuidance(guidance_scale=SCALE).forward(c, u).pred
    alpha, noise_std = (torch.full((2,), value) for value in FORWARD[prediction](sigma))
    expected, gradient, probability, chosen = ppap.guided_denoised(
        sample.denoised(cfg), x, torch.full((2,), sigma), alpha, noise_std, experts, squashed_model_input,
        "colour", 1, 3.0)
    assert gradient.abs().amax() > 0 and not torch.allclose(expected, sample.denoised(cfg), atol=1e-3)
    assert torch.allclose(sample.denoised(out), expected, atol=1e-4)
    assert guider.guidance_log == [{"step": 0, "sigma": sigma, "experts": [expert, expert],
                                    "target_probability": probability.tolist(),
                                    "gradient_norm": ppap.gradient_norms(gradient)}]
    assert chosen.tolist() == [expert, expert]


def target_probability(experts: ppap.ExpertClassifier, latents: torch.Tensor, target: int) -> float:
    with torch.no_grad():
        return float(experts.logits(latents, 0)["colour"].softmax(-1)[:, target].mean())


def test_ppap_end_to_end_steers_toward_the_target_and_is_cfg_at_scale_zero(shown_pipe, inputs, cfg_run):
    experts = td.tiny_experts()
    off, calls = run(shown_pipe, PPAP(experts=experts, head="colour", target=0, scale=0.0, guidance_scale=SCALE),
                     inputs)
    assert calls == 2 * STEPS and torch.equal(off, cfg_run[0])
    guider = PPAP(experts=experts, head="colour", target=0, scale=2.0, guidance_scale=SCALE)
    guided, calls = run(shown_pipe, guider, inputs)
    assert calls == 2 * STEPS and not torch.allclose(guided, cfg_run[0], atol=1e-3)
    assert [(entry["step"], entry["experts"]) for entry in guider.guidance_log] == [(0, [1]), (1, [1]), (2, [0]),
                                                                                   (3, [0])]
    assert target_probability(experts, guided, 0) > target_probability(experts, cfg_run[0], 0)
    again, _ = run(shown_pipe, guider, inputs)  # a second call: fresh state, same images
    assert len(guider.guidance_log) == STEPS and torch.allclose(again, guided)
    late = PPAP(experts=experts, head="colour", target=0, scale=2.0, guidance_scale=SCALE, start=0.5)
    run(shown_pipe, late, inputs)
    assert [entry["step"] for entry in late.guidance_log] == [2, 3]


def test_ppap_errors_name_the_guider_and_the_input(pipe, shown_pipe, inputs):
    with pytest.raises(ValueError, match=r"PPAP \(diffusers\): 'experts' must be a samplers.ppap.ExpertClassifier"):
        PPAP(experts=td.TinyExpertNetwork(), head="colour")
    with pytest.raises(ValueError, match=r"PPAP \(diffusers\): 'head' must name an output head .*'shape'"):
        PPAP(experts=td.tiny_experts(), head="shape")
    with pytest.raises(ValueError, match=r"PPAP \(diffusers\): 'target' 3 is not a class index of head 'colour'"):
        PPAP(experts=td.tiny_experts(), head="colour", target=3)
    with pytest.raises(ValueError, match=r"PPAP \(diffusers\): 'scale' must be finite and >= 0"):
        PPAP(experts=td.tiny_experts(), head="colour", scale=-1.0)
    with pytest.raises(ValueError, match=r"PPAP \(diffusers\): 'read_pixels' must be a callable"):
        PPAP(experts=td.tiny_experts(), head="colour", read_pixels="vae")
    with pytest.raises(ValueError, match=r"PPAP \(diffusers\): needs each step's latents and sigma.*show_latents"):
        run(pipe, PPAP(experts=td.tiny_experts(), head="colour"), inputs)
    assert pipe.counter.calls == 0
    with pytest.raises(ValueError, match=r"PPAP \(diffusers\) 'experts': step 0 is at sigma 4.1.*, above the "
                                         r"experts' noise ranges \(sigma 0 to 1\)"):
        run(shown_pipe, PPAP(experts=td.tiny_experts(ranges=((0.0, 1.0),)), head="colour"), inputs)
    assert shown_pipe.counter.calls == 0


# All guiders

def public(config) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_config_round_trip(calibration_file, tmp_path):
    weak = td.tiny_unet(seed=7, width=16)
    guiders = [AdaptiveGuidance(guidance_scale=3.0, threshold=0.9, quantity="prediction", switch_end=0.5),
               LinearAG(calibration=str(calibration_file), guidance_scale=SCALE, true_every=3),
               ComposableGuidance(weights=[3.0, -1.0], concepts=[td.concept_inputs(1)]),
               Autoguidance(weak_model=weak, guidance_scale=2.5),
               gfcg_guider(PROBABILITIES, max_scale=3.0, start_sigma=1.0, every=2),
               PPAP(experts=td.tiny_experts(), read_pixels=squashed_model_input, head="colour", target=2, scale=4.0,
                    stop=0.5)]
    runtime = {ComposableGuidance: {"concepts": [td.concept_inputs(1)]}, Autoguidance: {"weak_model": weak},
               GFCG: {"classifier": guiders[4].classifier, "references": guiders[4].references},
               PPAP: {"experts": guiders[5].experts, "read_pixels": squashed_model_input}}
    for guider in guiders:
        folder = tmp_path / type(guider).__name__
        guider.save_pretrained(folder)
        loaded = type(guider).from_pretrained(folder, **runtime.get(type(guider), {}))
        assert public(loaded.config) == public(guider.config)
        assert public(guider.new().config) == public(guider.config)
    ag_copy = guiders[0].new(threshold=0.5)
    assert (ag_copy.guidance_scale, ag_copy.threshold, ag_copy.quantity, ag_copy._window) == (3.0, 0.5, "prediction",
                                                                                               (1.0, 0.5))
    assert LinearAG.from_pretrained(tmp_path / "LinearAG")._pattern == lag.step_pattern(STEPS, 3, 0.5)
    assert guiders[2].new().concepts[0] is guiders[2].concepts[0] and guiders[3].new().weak_model is weak
    loaded = GFCG.from_pretrained(tmp_path / "GFCG", **runtime[GFCG])
    assert (loaded.targets, loaded.max_scale, loaded.start_sigma, loaded.every) == ({"colour": 0}, 3.0, 1.0, 2)
    assert guiders[4].new().classifier is guiders[4].classifier
    loaded = PPAP.from_pretrained(tmp_path / "PPAP", **runtime[PPAP])
    assert (loaded.head, loaded.target, loaded.scale, loaded._stop) == ("colour", 2, 4.0, 0.5)
    assert guiders[5].new().experts is guiders[5].experts and guiders[5].new().read_pixels is squashed_model_input


# The toy-world example (scripts/toy_diffusers_guiders.py)

def test_toy_example_loop_runs_the_guiders_on_the_toy_model():
    import importlib.util

    from guidance_kit.toyworld import scenes, weights

    spec = importlib.util.spec_from_file_location("toy_diffusers_guiders",
                                                  REPO / "scripts" / "toy_diffusers_guiders.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    dit, text_encoder = weights.load_main()
    cond = text_encoder(torch.tensor([scenes.tokenize(scenes.dev_prompts()[0][0])]))
    uncond = text_encoder(torch.tensor([scenes.tokenize("")]))
    cfg = example.denoise(ClassifierFreeGuidance(guidance_scale=4.0), dit, cond, uncond, steps=3, seed=0)
    same = example.denoise(AdaptiveGuidance(guidance_scale=4.0, threshold=1.0), dit, cond, uncond, steps=3, seed=0)
    weak = example.denoise(Autoguidance(weak_model=weights.load_weak(), guidance_scale=2.0), dit, cond, uncond,
                           steps=3, seed=0)
    assert torch.equal(cfg, same) and not torch.allclose(cfg, weak)


def test_docs_quick_start_runs(monkeypatch, capsys):
    page = (REPO / "docs" / "diffusers.md").read_text()
    block = page.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    exec(compile(block, "docs/diffusers.md", "exec"), {})  # noqa: S102 (the page's own example)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "ClassifierFreeGuidance UNet calls: 16"
    assert printed[1].startswith("AdaptiveGuidance UNet calls: ") and int(printed[1].split()[-1]) < 16


def test_guiders_guide_only_inside_their_start_stop_window():
    composable = ComposableGuidance(weights=[SCALE, 1.0], concepts=[td.concept_inputs(1)], stop=0.5)
    autoguidance = Autoguidance(weak_model=td.tiny_unet(seed=7, width=16), start=0.5)
    for index, (composable_conditions, autoguidance_conditions) in enumerate([(3, 1), (3, 1), (1, 2), (1, 2)]):
        step(composable, index)
        step(autoguidance, index)
        assert (composable.num_conditions, autoguidance.num_conditions) == \
            (composable_conditions, autoguidance_conditions)


# show_latents

def test_show_latents_leaves_other_guiders_alone(shown_pipe, inputs, cfg_run):
    latents, calls = run(shown_pipe, ClassifierFreeGuidance(guidance_scale=SCALE), inputs)
    assert calls == 2 * STEPS and torch.equal(latents, cfg_run[0])
    with pytest.raises(ValueError, match="show_latents: .* has no denoise loop"):
        show_latents(ClassifierFreeGuidance())


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_step_sample_clean_estimate_is_the_schedulers(prediction):
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(prediction_type=prediction)
    scheduler.set_timesteps(10)
    x, output = torch.randn(2, 1, 4, 8, 8).unbind(0)
    t = scheduler.timesteps[3]
    scheduler.scale_model_input(x, t)  # sets the step index, as the loop's before-denoiser step does
    sample = StepSample(x, sigma_at(scheduler, t), prediction_type(scheduler))
    expected = scheduler.step(output, t, x).pred_original_sample
    assert torch.allclose(sample.denoised(output), expected, atol=1e-5)
    assert torch.allclose(sample.output(sample.denoised(output)), output, atol=1e-4)
