"""Causality-Aware Schedule (after LINA): the SIGMAS node on every tiny family and the toy model, through the
executor; a sampling run with SamplerCustom on it, alone and under a pack MODEL patch."""
import pytest
import torch

import comfy.samplers
from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustom, SamplerCustomAdvanced

from harness.executor import run_node
from harness.sampling import cfg_guider, sigmas_for

STEPS = 10
NODE = r"^Causality-Aware Schedule \(after LINA\)"


def schedule(model, *, scheduler="simple", steps=STEPS, share=0.5, boundary=0.2, denoise=1.0):
    from guidance_kit.nodes.lina import LINASchedule

    return run_node(LINASchedule, model, scheduler, steps, share, boundary, denoise)[0]


def boundary_sigma(model, boundary):
    return float(model.get_model_object("model_sampling").percent_to_sigma(boundary))


def check_shape(sigmas, base, share, sigma_b):
    assert sigmas.shape == base.shape
    assert float(sigmas[0]) == pytest.approx(float(base[0]), rel=1e-6) and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all()), sigmas
    early = round(share * (base.numel() - 1))
    assert float(sigmas[early]) == pytest.approx(sigma_b, rel=1e-5), "the boundary is not the k-th sigma"
    assert int((sigmas > sigma_b * (1 + 1e-5)).sum()) == early, "not round(share x steps) steps before it"


@pytest.mark.parametrize("scheduler", ["simple", "karras", "normal"])
@pytest.mark.parametrize("share", [0.3, 0.7])
def test_schedule_keeps_steps_endpoints_and_share_on_every_tiny_family(tiny, scheduler, share):
    base = sigmas_for(tiny.patcher, STEPS, scheduler)
    sigmas = schedule(tiny.patcher, scheduler=scheduler, share=share, boundary=0.2)
    check_shape(sigmas, base, share, boundary_sigma(tiny.patcher, 0.2))


def test_schedule_on_the_toy_model_moves_steps_early(toy):
    base = sigmas_for(toy.model, 20, "simple")
    sigma_b = boundary_sigma(toy.model, 0.2)
    base_early = int((base > sigma_b).sum())
    sigmas = schedule(toy.model, steps=20, share=0.5, boundary=0.2)
    check_shape(sigmas, base, 0.5, sigma_b)
    assert int((sigmas > sigma_b).sum()) > base_early


def percent_of(model, sigma):
    """The model percent whose sigma is ``sigma`` (bisection; percent_to_sigma decreases)."""
    low, high = 0.0, 1.0
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if boundary_sigma(model, middle) > sigma else (low, middle)
    return (low + high) / 2


def test_the_base_schedules_own_share_gives_back_the_base(tiny):
    """Boundary on the base's j-th sigma and share j / N: the schedule is the base schedule."""
    base = sigmas_for(tiny.patcher, STEPS, "simple")
    for j in (2, 5, 8):
        sigmas = schedule(tiny.patcher, share=j / STEPS, boundary=percent_of(tiny.patcher, float(base[j])))
        torch.testing.assert_close(sigmas, base, rtol=1e-5, atol=1e-6)


def test_edge_cases_one_step_extreme_share_and_denoise(toy):
    base = sigmas_for(toy.model, 1, "simple")
    torch.testing.assert_close(schedule(toy.model, steps=1), base)
    sigma_b = boundary_sigma(toy.model, 0.2)
    check_shape(schedule(toy.model, share=0.0), sigmas_for(toy.model, STEPS, "simple"), 1 / STEPS, sigma_b)
    check_shape(schedule(toy.model, share=1.0), sigmas_for(toy.model, STEPS, "simple"), 1 - 1 / STEPS, sigma_b)
    partial = schedule(toy.model, share=0.5, boundary=0.6, denoise=0.5)
    full = sigmas_for(toy.model, 2 * STEPS, "simple")
    assert partial.shape == (STEPS + 1,) and float(partial[0]) == pytest.approx(float(full[STEPS]))
    assert bool((partial[1:] < partial[:-1]).all())


def test_bad_inputs_are_errors_naming_the_input(toy):
    for name, value in (("share", 1.5), ("share", float("nan")), ("boundary", 0.0), ("boundary", 1.0),
                        ("steps", 0), ("denoise", 0.0), ("steps", 2.5)):
        with pytest.raises(ValueError, match=NODE + f": '{name}'"):
            schedule(toy.model, **{name: value})
    with pytest.raises(ValueError, match=NODE + ": 'scheduler'"):
        schedule(toy.model, scheduler="no such scheduler")
    with pytest.raises(ValueError, match=NODE + ": 'boundary' 0.2 .* lies before this schedule's start"):
        schedule(toy.model, boundary=0.2, denoise=0.5)


def sample_custom(model, toy, sigmas, cfg=4.0):
    output = run_node(SamplerCustom, model, True, 0, cfg, toy.positive, toy.negative,
                      comfy.samplers.sampler_object("euler"), sigmas, toy.latent(2))
    return output[0]["samples"]


def test_sampler_custom_runs_on_the_schedule_and_it_changes_the_image(toy):
    sigmas = schedule(toy.model, steps=8, share=0.6, boundary=0.2)
    lina = sample_custom(toy.model, toy, sigmas)
    base = sample_custom(toy.model, toy, sigmas_for(toy.model, 8, "simple"))
    assert torch.isfinite(lina).all() and lina.shape == base.shape
    assert float((lina - base).abs().max()) > 1e-3, "the schedule did not reach the sampler"
    guided = run_node(SamplerCustomAdvanced, Noise_RandomNoise(0), cfg_guider(toy.model, toy.positive, toy.negative,
                                                                               4.0),
                      comfy.samplers.sampler_object("euler"), sigmas, toy.latent(2))[0]["samples"]
    torch.testing.assert_close(guided, lina, rtol=1e-4, atol=1e-5)


def test_schedule_stacks_with_adaptive_guidance(toy):
    """A SIGMAS node installs nothing on the MODEL: a pack patch over the model acts on the LINA schedule."""
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceModelPatch
    from guidance_kit.nodes.contract.stats import stats_sink

    patched = run_node(AdaptiveGuidanceModelPatch, toy.model, 0.5, "auto", 0.0, 1.0)[0]
    sigmas = schedule(patched, steps=8, share=0.6, boundary=0.2)
    torch.testing.assert_close(sigmas, schedule(toy.model, steps=8, share=0.6, boundary=0.2))
    samples = sample_custom(patched, toy, sigmas)
    run = stats_sink(patched).last
    assert torch.isfinite(samples).all()
    assert "AG" in {part for name in run.techniques_acted for part in name.split("+")}
    assert run.rows < run.baseline_rows, "Adaptive Guidance at threshold 0.5 never dropped the unconditional"
