"""LinearAG: calibration, the saved file, the regression's accuracy, the pattern, and mismatches."""
import logging

import pytest
import torch

import comfy.utils
import folder_paths

from harness.executor import run_node
from harness.sampling import cfg_guider, ksample, sample_guider
from harness.tiny_models import WordClip

STEPS = 6
CFG = 5.0


def prompts(tiny, count, offset=0):
    """Distinct positive CONDITIONINGs for a tiny model (random cross-attention, the family's extras)."""
    embedding, extras = tiny.positive[0]
    return [[[torch.randn(embedding.shape, generator=torch.Generator().manual_seed(100 + offset + i)), dict(extras)]]
            for i in range(count)]


@pytest.fixture(scope="module")
def calibrated(tiny_eps):
    from guidance_kit.nodes.linear_ag import calibrate

    return calibrate(tiny_eps.patcher, prompts(tiny_eps, 3), tiny_eps.negative, tiny_eps.empty_latent(batch=2), seed=0,
                     steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal", negative_prompt="(tiny negative)")


def linear_ag_guider(tiny, calibration, true_every=2, guided_until=0.5, positive=None, negative=None, model=None):
    from guidance_kit.nodes.linear_ag import LinearAGGuider

    return run_node(LinearAGGuider, model or tiny.patcher, positive or tiny.positive, negative or tiny.negative, CFG,
                                  calibration, true_every, guided_until)[0]


def last_run(guider):
    from guidance_kit.nodes.contract.stats import stats_sink

    return stats_sink(guider.model_patcher).last


def test_regression_beats_reusing_the_previous_unconditional_on_held_out_trajectories(tiny_eps, calibrated):
    from guidance_kit.nodes.linear_ag import full_cfg_trajectories
    from guidance_kit.samplers.linear_ag import heldout_errors

    for xs, conds, unconds, _, _ in full_cfg_trajectories(
            tiny_eps.patcher, prompts(tiny_eps, 2, offset=50), tiny_eps.negative, tiny_eps.empty_latent(batch=2),
            seed=77, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal"):
        errors = heldout_errors(calibrated.coefficients, calibrated.terms, xs, conds, unconds)
        ratio = errors["regression"] / errors["previous_uncond"]
        assert ratio < 0.5
        assert errors["regression"] < errors["previous_difference"]
        assert errors["regression"] < errors["conditional"]  # it recovers part of the guidance itself


def test_calibration_file_round_trip_and_metadata(calibrated, tmp_path):
    from guidance_kit.nodes.linear_ag import Calibration

    path = tmp_path / "calibration.safetensors"
    calibrated.save(path)
    loaded = Calibration.load(path)
    assert torch.equal(loaded.coefficients, calibrated.coefficients)
    assert loaded.coefficients.shape == (STEPS, STEPS, 4, len(loaded.terms)) and loaded.terms == calibrated.terms
    assert loaded.info["steps"] == STEPS and loaded.info["sampler"] == "euler" and loaded.info["scheduler"] == "normal"
    assert loaded.info["negative_prompt"] == "(tiny negative)" and loaded.info["model"].startswith("BaseModel:")
    assert loaded.info["images"] == 6

    from safetensors.torch import save_file

    save_file({"coefficients": torch.zeros(2, 2, 4, 4)}, str(tmp_path / "bad.safetensors"),
              metadata={"format": "guidance_kit.linear_ag/1"})
    with pytest.raises(ValueError, match="missing evaluation_sigmas"):
        Calibration.load(tmp_path / "bad.safetensors")


def test_pattern_and_rows(tiny_eps, calibrated):
    from guidance_kit.samplers.linear_ag import step_pattern

    rows = sum(2 if kind == "true" else 1 for kind in step_pattern(20, 2, 0.5))
    assert rows == 25  # the paper's 25 NFEs instead of 40
    assert step_pattern(6, 2, 0.5) == ["true", "regressed", "true", "conditional", "conditional", "conditional"]
    guider = linear_ag_guider(tiny_eps, calibrated, true_every=3, guided_until=1.0)
    got = sample_guider(guider, tiny_eps.empty_latent(batch=2), steps=STEPS)
    run = last_run(guider)
    assert [e.rows for e in run.evaluations] == [4, 2, 2, 4, 2, 2]
    assert run.baseline_rows == 24 and torch.isfinite(got).all()


def test_true_cfg_everywhere_is_plain_cfg(tiny_eps, calibrated):
    latent = tiny_eps.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, CFG), latent,
                             steps=STEPS)
    assert torch.equal(sample_guider(linear_ag_guider(tiny_eps, calibrated, 1, 1.0), latent, steps=STEPS), expected)


def test_model_patch_with_ksampler_matches_the_guider(tiny_eps, calibrated):
    from guidance_kit.nodes.linear_ag import LinearAGModelPatch

    latent = tiny_eps.empty_latent(batch=1)
    expected = sample_guider(linear_ag_guider(tiny_eps, calibrated), latent, steps=STEPS, seed=3)
    patched = run_node(LinearAGModelPatch, tiny_eps.patcher, calibrated, 2, 0.5)[0]
    got = ksample(patched, tiny_eps.positive, tiny_eps.negative, latent, cfg=CFG, steps=STEPS, seed=3)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mismatch", ["steps", "scheduler", "sampler", "negative"])
def test_mismatch_warns_and_samples_with_true_cfg(tiny_eps, calibrated, mismatch, caplog):
    latent = tiny_eps.empty_latent(batch=1)
    negative = prompts(tiny_eps, 1, offset=70)[0] if mismatch == "negative" else tiny_eps.negative
    settings = {"steps": STEPS + 1 if mismatch == "steps" else STEPS,
                "scheduler": "karras" if mismatch == "scheduler" else "normal",
                "sampler": "heun" if mismatch == "sampler" else "euler"}
    expected = sample_guider(cfg_guider(tiny_eps.patcher, tiny_eps.positive, negative, CFG), latent, **settings)
    guider = linear_ag_guider(tiny_eps, calibrated, negative=negative)
    with caplog.at_level(logging.WARNING):
        got = sample_guider(guider, latent, **settings)
    assert torch.equal(got, expected)
    assert any("LinearAG" in r.message and "true CFG" in r.message for r in caplog.records)
    assert "true CFG" in last_run(guider).events[0][1] and last_run(guider).rows_saved == 0


def test_calibration_from_another_model_is_an_error(calibrated):
    from harness import tiny_models

    other = tiny_models.build("sd15_eps", seed=1)
    with pytest.raises(ValueError, match="calibrat"):
        linear_ag_guider(other, calibrated)


def test_calibrate_node_saves_the_file_and_reports_progress(tiny_eps, tmp_path, monkeypatch):
    from guidance_kit.nodes.linear_ag import LinearAGCalibrate, LinearAGLoad

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "linear_ag", ([str(tmp_path)], {".safetensors"}))
    ticks = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: ticks.append(
        (value, total)))
    calibration = run_node(LinearAGCalibrate, tiny_eps.patcher, WordClip(tiny_eps), "a cat\n\n a dog \n", "blurry",
                                            tiny_eps.empty_latent(batch=1), 0, 4, CFG, "euler", "normal",
                                            "tiny")[0]
    assert (tmp_path / "tiny.safetensors").is_file()
    assert ticks[-1] == (8, 8) and len(ticks) == 8
    loaded = run_node(LinearAGLoad, "tiny.safetensors")[0]
    assert torch.equal(loaded.coefficients, calibration.coefficients) and loaded.info["prompts"] == 2
    with pytest.raises(ValueError, match="filename"):
        run_node(LinearAGCalibrate, tiny_eps.patcher, WordClip(tiny_eps), "a cat", "", tiny_eps.empty_latent(batch=1),
                                  0, 4, CFG, "euler", "normal", "../escape")
