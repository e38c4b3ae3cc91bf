"""Adaptive Guidance (learned): labels, features, the policy file, calibration, the apply nodes, mismatches."""
import logging
import math

import pytest
import torch

import comfy.utils
import folder_paths

from harness.executor import run_node
from harness.sampling import cfg_guider, ksample, sample_guider, switched_cfg_guider
from harness.tiny_models import WordClip

STEPS = 4
CFG = 5.0


class LatentAsImage:
    """A VAE stand-in for the tiny models (no VAE): the latent itself, channels last."""

    def decode(self, samples):
        return samples.movedim(1, -1)


def words(count, offset=0):
    return [f"prompt {offset + i}" for i in range(count)]


def calibrate_tiny(tiny, tolerance=None, count=3):
    from guidance_kit.nodes.learned_ag import collect, fit_policy

    clip = WordClip(tiny)
    records = collect(tiny.patcher, LatentAsImage(), [clip.encode_from_tokens_scheduled(w) for w in words(count)],
                      tiny.negative, tiny.empty_latent(batch=2), seed=0, steps=STEPS, cfg=CFG, sampler_name="euler",
                      scheduler="normal")
    if tolerance is None:  # half the images are safe at the median distance
        tolerance = float(torch.cat([r["distances"][:, 1:STEPS] for r in records]).median())
    return records, fit_policy(tiny.patcher, records, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
                               tolerance=tolerance)


@pytest.fixture(scope="module")
def calibrated(tiny_eps):
    return calibrate_tiny(tiny_eps)


def learned_guider(tiny, policy, threshold, model=None):
    from guidance_kit.nodes.learned_ag import LearnedAGGuider

    return run_node(LearnedAGGuider, model or tiny.patcher, tiny.positive, tiny.negative, CFG, policy, threshold)[0]


def last_run(guider):
    from guidance_kit.nodes.contract.stats import stats_sink

    return stats_sink(guider.model_patcher).last


def test_earliest_safe_step_needs_every_later_step_within_tolerance():
    from guidance_kit.samplers.learned_ag import earliest_safe_step, monotone_fraction

    inf = math.inf
    distances = torch.tensor([[inf, 0.5, 0.1, 0.3, 0.1, 0.0],    # back above tolerance at k=3: safe from 4
                              [inf, 0.1, 0.1, 0.1, 0.1, 0.0],    # safe from the first searched step
                              [inf, 0.5, 0.5, 0.5, 0.5, 0.0],    # only plain CFG
                              [inf, 0.5, inf, 0.1, inf, 0.0]])   # unsearched steps neither break nor label
    assert earliest_safe_step(distances, 0.2).tolist() == [4, 1, 5, 3]
    assert monotone_fraction(distances[:, 1:], 0.2) == 0.75


def test_logistic_fit_and_switch_steps():
    from guidance_kit.samplers.learned_ag import fit_logistic, switch_steps

    x = torch.linspace(-3, 3, 200)[:, None]
    w, b, mean, std = fit_logistic(torch.cat([x, torch.randn(200, 1, generator=torch.Generator().manual_seed(0))], 1),
                                   (x[:, 0] > 0.5).float())
    assert w[0] > 5 * abs(w[1])
    p = torch.tensor([[0.1, 0.6, 0.2, 0.9], [0.1, 0.1, 0.1, 0.1]])
    assert switch_steps(p, 0.5).tolist() == [2, 4]


def test_branches_equal_cfg_then_conditional_only(tiny_eps):
    """The calibration's branch from step k's latent is the image of CFG on the first k steps, then cond only."""
    from guidance_kit.nodes.learned_ag import record_outcomes

    latent = tiny_eps.empty_latent(batch=2)
    record = record_outcomes(tiny_eps.patcher, LatentAsImage(), tiny_eps.positive, tiny_eps.negative, latent, seed=3,
                             steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal", keep_images=True)
    assert math.isinf(record["distances"][0, 0]) and record["distances"][0, STEPS] == 0
    assert record["features"].shape[:2] == (STEPS, 2) and record["steps"].tolist() == list(range(STEPS))
    for k in (1, STEPS - 1):
        reference = switched_cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, CFG,
                                        lambda sigma, sigmas, k=k: sigma >= float(sigmas[k - 1]))
        expected = sample_guider(reference, latent, steps=STEPS, seed=3).movedim(1, -1)
        torch.testing.assert_close(record["branch_images"][k], expected, rtol=1e-4, atol=1e-4)
        distance = (expected - record["images"]).abs().flatten(1).mean(1)
        torch.testing.assert_close(record["distances"][:, k], distance, rtol=1e-3, atol=1e-5)


def test_policy_file_round_trip_and_metadata(calibrated, tmp_path):
    from guidance_kit.samplers.learned_ag import DYNAMIC_FEATURES, Policy

    _, policy = calibrated
    path = tmp_path / "policy.safetensors"
    policy.save(path)
    loaded = Policy.load(path)
    assert torch.equal(loaded.weights, policy.weights) and loaded.feature_names == policy.feature_names
    assert len(loaded.feature_names) == len(DYNAMIC_FEATURES) + loaded.prompt_basis.shape[0]
    info = loaded.info
    assert info["steps"] == STEPS and info["sampler"] == "euler" and info["scheduler"] == "normal"
    assert info["cfg"] == CFG and info["model"].startswith("BaseModel:") and info["images"] == 6
    assert info["tolerance"] == policy.info["tolerance"] and len(info["schedule"]) == STEPS + 1

    from safetensors.torch import save_file

    save_file({key: getattr(policy, key).contiguous() for key in ("weights", "bias", "mean", "std", "prompt_mean")},
              str(tmp_path / "bad.safetensors"), metadata={"format": "guidance_kit.learned_ag/1"})
    with pytest.raises(ValueError, match="missing prompt_basis"):
        Policy.load(tmp_path / "bad.safetensors")
    save_file({key: (getattr(policy, key)[:1] if key == "weights" else getattr(policy, key)).contiguous()
               for key in ("weights", "bias", "mean", "std", "prompt_mean", "prompt_basis")},
              str(tmp_path / "shapes.safetensors"), metadata={"format": "guidance_kit.learned_ag/1"})
    with pytest.raises(ValueError, match="inconsistent shapes"):
        Policy.load(tmp_path / "shapes.safetensors")


def test_threshold_one_is_plain_cfg_and_zero_switches_after_the_first_step(tiny_eps, calibrated):
    _, policy = calibrated
    latent = tiny_eps.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, CFG), latent,
                             steps=STEPS)
    assert torch.equal(sample_guider(learned_guider(tiny_eps, policy, 1.0), latent, steps=STEPS), expected)

    guider = learned_guider(tiny_eps, policy, 0.0)
    got = sample_guider(guider, latent, steps=STEPS)
    reference = switched_cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, CFG,
                                    lambda sigma, sigmas: sigma >= float(sigmas[0]))
    torch.testing.assert_close(got, sample_guider(reference, latent, steps=STEPS), rtol=1e-5, atol=1e-5)
    run = last_run(guider)
    assert [e.rows for e in run.evaluations] == [4] + [2] * (STEPS - 1)
    probabilities = run.evaluations[0].signals["p_safe"]
    assert len(probabilities) == 2 and all(0.0 <= p <= 1.0 for p in probabilities)
    assert run.evaluations[1].signals["p_safe"] == [None, None]
    assert [text for _, text in run.events] == [f"sample {i} switched to conditional only (p {p:.3f} >= 0.0)"
                                                for i, p in enumerate(probabilities)]


def test_samples_switch_where_the_policy_says(tiny_eps, calibrated):
    """Per sample: it keeps CFG until the first evaluation with p ≥ threshold, then the conditional alone."""
    _, policy = calibrated
    latent = tiny_eps.empty_latent(batch=2)
    probe = learned_guider(tiny_eps, policy, 1.0)
    sample_guider(probe, latent, steps=STEPS, seed=1)
    probabilities = torch.tensor([e.signals["p_safe"] for e in last_run(probe).evaluations]).T  # [B, E]
    threshold = float(probabilities.flatten().median())
    from guidance_kit.samplers.learned_ag import switch_steps

    expected_steps = switch_steps(probabilities, threshold).tolist()
    guider = learned_guider(tiny_eps, policy, threshold)
    sample_guider(guider, latent, steps=STEPS, seed=1)
    rows = [e.rows for e in last_run(guider).evaluations]
    assert rows == [sum(1 + (step < k) for k in expected_steps) for step in range(STEPS)]


def test_each_run_starts_fresh_and_model_patch_matches_guider(tiny_eps, calibrated):
    from guidance_kit.nodes.learned_ag import LearnedAGModelPatch

    _, policy = calibrated
    latent = tiny_eps.empty_latent(batch=1)
    guider = learned_guider(tiny_eps, policy, 0.0)
    first = sample_guider(guider, latent, steps=STEPS, seed=2)
    assert torch.equal(sample_guider(guider, latent, steps=STEPS, seed=2), first)
    assert last_run(guider).evaluations[0].rows == 2
    patched = run_node(LearnedAGModelPatch, tiny_eps.patcher, policy, 0.0)[0]
    assert torch.equal(ksample(patched, tiny_eps.positive, tiny_eps.negative, latent, cfg=CFG, steps=STEPS, seed=2),
                       first)


@pytest.mark.parametrize("mismatch", ["steps", "scheduler", "sampler", "cfg"])
def test_mismatch_warns_and_samples_plain_cfg(tiny_eps, calibrated, mismatch, caplog):
    from guidance_kit.nodes.learned_ag import LearnedAGGuider

    _, policy = calibrated
    latent = tiny_eps.empty_latent(batch=1)
    cfg = CFG + 1 if mismatch == "cfg" else CFG
    settings = {"steps": STEPS + 1 if mismatch == "steps" else STEPS,
                "scheduler": "karras" if mismatch == "scheduler" else "normal",
                "sampler": "heun" if mismatch == "sampler" else "euler"}
    expected = sample_guider(cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, cfg), latent,
                             **settings)
    guider = run_node(LearnedAGGuider, tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, cfg, policy, 0.0)[0]
    with caplog.at_level(logging.WARNING):
        got = sample_guider(guider, latent, **settings)
    assert torch.equal(got, expected)
    assert any("Adaptive Guidance (learned)" in r.message and "plain CFG" in r.message for r in caplog.records)
    assert "plain CFG" in last_run(guider).events[0][1] and last_run(guider).rows_saved == 0


def test_policy_from_another_model_or_bad_inputs_are_errors(calibrated):
    from harness import tiny_models

    _, policy = calibrated
    other = tiny_models.build("sd15_eps", seed=1)
    with pytest.raises(ValueError, match="calibrated on model"):
        learned_guider(other, policy, 0.5)
    with pytest.raises(ValueError, match="'policy' must come from"):
        learned_guider(other, "not a policy", 0.5)


def test_calibrate_node_saves_the_file_and_reports_progress(tiny_eps, tmp_path, monkeypatch):
    from guidance_kit.nodes.learned_ag import LearnedAGCalibrate, LearnedAGLoad

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "learned_ag", ([str(tmp_path)], {".safetensors"}))
    ticks = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: ticks.append(
        (value, total)))
    policy = run_node(LearnedAGCalibrate, tiny_eps.patcher, WordClip(tiny_eps), LatentAsImage(), "a cat\n\n a dog \n",
                      "", tiny_eps.empty_latent(batch=1), 0, STEPS, CFG, "euler", "normal", 0.05, "tiny")[0]
    assert (tmp_path / "tiny.safetensors").is_file()
    total = 2 * (STEPS + STEPS - 1)
    assert ticks[-1] == (total, total) and len(ticks) == total
    loaded = run_node(LearnedAGLoad, "tiny.safetensors")[0]
    assert torch.equal(loaded.weights, policy.weights) and loaded.info["prompts"] == 2
    with pytest.raises(ValueError, match="filename"):
        run_node(LearnedAGCalibrate, tiny_eps.patcher, WordClip(tiny_eps), LatentAsImage(), "a cat", "",
                 tiny_eps.empty_latent(batch=1), 0, STEPS, CFG, "euler", "normal", 0.05, "../escape")
    with pytest.raises(ValueError, match="'prompts' is empty"):
        run_node(LearnedAGCalibrate, tiny_eps.patcher, WordClip(tiny_eps), LatentAsImage(), " \n", "",
                 tiny_eps.empty_latent(batch=1), 0, STEPS, CFG, "euler", "normal", 0.05, "tiny")


def test_calibrates_and_samples_on_every_tiny_family(tiny):
    _, policy = calibrate_tiny(tiny, count=2)
    latent = tiny.empty_latent(batch=2)
    guider = learned_guider(tiny, policy, 0.0)
    got = sample_guider(guider, latent, steps=STEPS)
    assert torch.isfinite(got).all() and last_run(guider).rows_saved == 2 * (STEPS - 1)
