"""Adaptive Guidance on real ComfyUI sampling paths (tiny random-weight models).

The exactness tests rely on one fact: until a sample switches, AG *is* plain CFG (the same
batched [cond, uncond] call), so the cosines of a γ̄ = 1.0 run predict exactly where a lower γ̄
switches; the reference for "CFG, then conditional only" is ComfyUI's own sampling_function with
cfg = 1 below the switch sigma.
"""
import itertools

import pytest
import torch

import comfy.samplers
from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced

from harness.executor import run_node
from harness.sampling import cfg_guider, ksample, sample_guider, sigmas_for, switched_cfg_guider

STEPS = 6


def ag_guider(tiny, threshold, *, measure="denoised", cfg=5.0, start=0.0, end=1.0, model=None):
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceGuider

    return run_node(AdaptiveGuidanceGuider, model or tiny.patcher, tiny.positive, tiny.negative, cfg, threshold,
                    measure, start, end)[0]


def last_run(guider):
    from guidance_kit.nodes.contract.stats import stats_sink

    return stats_sink(guider.model_patcher).last


class FixedNoise:
    seed = 0

    def __init__(self, noise):
        self.noise = noise

    def generate_noise(self, latent):
        return self.noise.clone()


def sample_with_noise(guider, noise, *, steps=STEPS, sampler="euler"):
    latent = {"samples": torch.zeros_like(noise)}
    sigmas = sigmas_for(guider.model_patcher, steps)
    return run_node(SamplerCustomAdvanced, FixedNoise(noise), guider, comfy.samplers.sampler_object(sampler), sigmas,
                                         latent)[0]["samples"]


def first_rise(values, start):
    """Index >= start of the first value above every earlier one (the switch point of γ̄ = value)."""
    for index in range(start, len(values)):
        if max(values[:index], default=-2.0) < values[index] < 1.0:
            return index
    raise AssertionError(f"no usable switch point in {values}")


def test_threshold_one_is_plain_cfg(tiny):
    latent = tiny.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(tiny.patcher, tiny.positive, tiny.negative, 5.0), latent, steps=4, seed=1)
    guider = ag_guider(tiny, 1.0)
    assert torch.equal(sample_guider(guider, latent, steps=4, seed=1), expected)
    run = last_run(guider)
    assert run.rows == run.baseline_rows == 4 * 2 * 2 and run.events == []
    assert all(len(e.signals["cosine"]) == 2 for e in run.evaluations)


def test_model_patch_threshold_one_is_plain_ksampler(tiny_eps):
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceModelPatch

    latent = tiny_eps.empty_latent(batch=2)
    patched = run_node(AdaptiveGuidanceModelPatch, tiny_eps.patcher, 1.0, "auto", 0.0, 1.0)[0]
    expected = ksample(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, latent, cfg=5.0, steps=STEPS)
    assert torch.equal(ksample(patched, tiny_eps.positive, tiny_eps.negative, latent, cfg=5.0, steps=STEPS), expected)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_ancestral"])
def test_switch_gives_cfg_then_conditional_only(tiny_eps, sampler):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    probe = ag_guider(tiny_eps, 1.0)
    sample_with_noise(probe, noise, sampler=sampler)
    evaluations = last_run(probe).evaluations
    switch = first_rise([e.signals["cosine"][0] for e in evaluations], len(evaluations) // 3)
    threshold, switch_sigma = evaluations[switch].signals["cosine"][0], evaluations[switch].sigma

    guider = ag_guider(tiny_eps, threshold)
    got = sample_with_noise(guider, noise, sampler=sampler)
    reference = switched_cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 5.0,
                                    lambda sigma, _: sigma >= switch_sigma)
    assert torch.equal(got, sample_with_noise(reference, noise, sampler=sampler))

    run = last_run(guider)
    assert [index for index, _ in run.events] == [switch] and "sample 0 switched" in run.events[0][1]
    assert [e.rows for e in run.evaluations] == [1 if e.sigma < switch_sigma else 2 for e in run.evaluations]
    assert 1 in [e.rows for e in run.evaluations]
    assert run.rows_saved == sum(e.baseline_rows - e.rows for e in run.evaluations) > 0


def test_sampler_that_goes_back_up_in_sigma(tiny_eps):
    """DPM++ 2S ancestral evaluates at a midpoint below the next step's sigma: a switched sample is
    measured again there (σ >= σ_s), each sample is marked once, and γ̄ = 1 is still plain CFG."""
    latent = tiny_eps.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 5.0), latent,
                             steps=4, sampler="dpmpp_2s_ancestral", seed=6)
    assert torch.equal(sample_guider(ag_guider(tiny_eps, 1.0), latent, steps=4, sampler="dpmpp_2s_ancestral", seed=6),
                       expected)
    guider = ag_guider(tiny_eps, 0.0)
    got = sample_guider(guider, latent, steps=4, sampler="dpmpp_2s_ancestral", seed=6)
    run = last_run(guider)
    assert torch.isfinite(got).all() and not torch.equal(got, expected)
    assert sorted(label.split()[1] for _, label in run.events) == ["0", "1"]
    assert run.evaluations[0].rows == 4 and run.rows_saved > 0


def test_model_patch_with_ksampler_matches_the_guider(tiny_eps):
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceModelPatch

    latent = tiny_eps.empty_latent(batch=1)
    probe = ag_guider(tiny_eps, 1.0)
    sample_guider(probe, latent, steps=STEPS, seed=2)
    cosines = [e.signals["cosine"][0] for e in last_run(probe).evaluations]
    threshold = cosines[first_rise(cosines, 2)]
    guider = ag_guider(tiny_eps, threshold)
    expected = sample_guider(guider, latent, steps=STEPS, seed=2)
    patched = run_node(AdaptiveGuidanceModelPatch, tiny_eps.patcher, threshold, "denoised", 0.0, 1.0)[0]
    got = ksample(patched, tiny_eps.positive, tiny_eps.negative, latent, cfg=5.0, steps=STEPS, seed=2)
    assert torch.equal(got, expected)
    assert last_run(guider).rows < last_run(guider).baseline_rows


def _threshold_splitting(cosines_per_sample, margin=2e-5):
    """A γ̄ at which the two samples switch at different evaluations, away from every cosine."""
    values = sorted({c for cosines in cosines_per_sample for c in cosines if c < 1.0})
    for low, high in itertools.pairwise(values):
        if high - low < 2 * margin:
            continue
        threshold = (low + high) / 2
        switches = [next((i for i, c in enumerate(cs) if c >= threshold), None) for cs in cosines_per_sample]
        if None not in switches and switches[0] != switches[1] and max(switches) < len(cosines_per_sample[0]) - 1:
            return threshold, switches
    raise AssertionError(f"no threshold splits {cosines_per_sample}")


def test_samples_in_a_batch_switch_independently(tiny_eps):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    probe = ag_guider(tiny_eps, 1.0)
    sample_with_noise(probe, noise)
    evaluations = last_run(probe).evaluations
    threshold, switches = _threshold_splitting([[e.signals["cosine"][i] for e in evaluations] for i in (0, 1)])

    guider = ag_guider(tiny_eps, threshold)
    batch = sample_with_noise(guider, noise)
    run = last_run(guider)
    assert sorted(index for index, _ in run.events) == sorted(switches)
    expected_rows = [2 + sum(e <= k for k in switches) for e in range(STEPS)]
    assert [e.rows for e in run.evaluations] == expected_rows
    assert run.rows == sum(expected_rows) < run.baseline_rows
    for i in (0, 1):
        alone = ag_guider(tiny_eps, threshold)
        single = sample_with_noise(alone, noise[i:i + 1])
        assert [index for index, _ in last_run(alone).events] == [switches[i]]
        # batch size changes float rounding (plain CFG too): compare at 1e-5 of the output's range
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-4, atol=1e-5 * float(single.abs().max()))


def test_each_run_starts_fresh(tiny_eps):
    latent = tiny_eps.empty_latent(batch=2)
    guider = ag_guider(tiny_eps, 0.9)
    first = sample_guider(guider, latent, steps=8, seed=4)
    shorter = sample_guider(guider, latent, steps=5, seed=4)
    assert torch.equal(shorter, sample_guider(ag_guider(tiny_eps, 0.9), latent, steps=5, seed=4))
    assert torch.equal(sample_guider(guider, latent, steps=8, seed=4), first)
    assert last_run(guider).events, "γ̄ = 0.9 should switch on the tiny model"


def test_chains_another_packs_calc_cond_batch_function(tiny_eps):
    calls = []

    def other_pack(args):
        calls.append([c is not None for c in args["conds"]] + [args["input"].shape[0]])
        out = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                             args["model_options"])
        return [o * 0.5 for o in out]

    other = tiny_eps.patcher.clone()
    other.set_model_sampler_calc_cond_batch_function(other_pack)
    latent = tiny_eps.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(other, tiny_eps.positive, tiny_eps.negative, 5.0), latent, steps=STEPS)
    calls.clear()
    guider = ag_guider(tiny_eps, 1.0, model=other)
    assert torch.equal(sample_guider(guider, latent, steps=STEPS), expected)
    assert calls == [[True, True, 2]] * STEPS

    calls.clear()
    switching = ag_guider(tiny_eps, 0.0, model=other)
    sample_guider(switching, latent, steps=STEPS)
    assert calls == [[True, True, 2]] + [[True, False, 2]] * (STEPS - 1)
    assert other.model_options["sampler_calc_cond_batch_function"] is other_pack


def test_start_and_end_percent_bound_where_a_switch_may_begin(tiny_eps):
    latent = tiny_eps.empty_latent(batch=1)
    model_sampling = tiny_eps.patcher.get_model_object("model_sampling")
    guider = ag_guider(tiny_eps, 0.0, start=0.5)
    sample_guider(guider, latent, steps=STEPS)
    run = last_run(guider)
    (index, _), = run.events
    start_sigma = model_sampling.percent_to_sigma(0.5)
    assert run.evaluations[index].sigma <= start_sigma < run.evaluations[index - 1].sigma

    probe = ag_guider(tiny_eps, 1.0)
    sample_guider(probe, latent, steps=STEPS)
    evaluations = last_run(probe).evaluations
    end_sigma = model_sampling.percent_to_sigma(0.5)
    late = first_rise([e.signals["cosine"][0] for e in evaluations],
                      next(i for i, e in enumerate(evaluations) if e.sigma < end_sigma))
    threshold = evaluations[late].signals["cosine"][0]
    too_late = ag_guider(tiny_eps, threshold, end=0.5)
    sample_guider(too_late, latent, steps=STEPS)
    assert last_run(too_late).events == [] and last_run(too_late).rows_saved == 0
    in_time = ag_guider(tiny_eps, threshold, end=1.0)
    sample_guider(in_time, latent, steps=STEPS)
    assert [index for index, _ in last_run(in_time).events] == [late]


def test_similarity_quantities():
    from guidance_kit.samplers.adaptive_guidance import similarity

    generator = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(3, 4, 5, 5, generator=generator) for _ in range(3))
    flat = lambda t: t.flatten(1)  # noqa: E731
    denoised = similarity("denoised", x, cond, uncond)
    torch.testing.assert_close(denoised, torch.nn.functional.cosine_similarity(flat(cond), flat(uncond)))
    noise = similarity("noise", x, cond, uncond, signal_scale=0.5)
    expected = torch.nn.functional.cosine_similarity(flat(x - 0.5 * cond), flat(x - 0.5 * uncond))
    torch.testing.assert_close(noise, expected)
    assert torch.allclose(similarity("guidance", x, cond, uncond, cfg_scale=1.0), torch.ones(3))
    with pytest.raises(ValueError, match="quantity"):
        similarity("velocity", x, cond, uncond)


def test_bad_inputs_are_named(tiny_eps):
    for bad in (1.5, float("nan")):
        with pytest.raises(ValueError, match="Adaptive Guidance: 'threshold' must be a finite number in"):
            ag_guider(tiny_eps, bad)
    with pytest.raises(ValueError, match="start_percent"):
        ag_guider(tiny_eps, 0.99, start=0.8, end=0.2)


def test_input_model_is_not_modified(tiny_eps):
    options_before = dict(tiny_eps.patcher.model_options)
    wrappers_before = {k: dict(v) for k, v in tiny_eps.patcher.wrappers.items()}
    ag_guider(tiny_eps, 0.99)
    assert tiny_eps.patcher.model_options == options_before
    assert tiny_eps.patcher.wrappers == wrappers_before
