"""Composable Diffusion (AND / NOT): the paper's rule, batched rows, the KSampler path, AG per concept."""
import re

import pytest
import torch

import comfy.samplers
import node_helpers
from comfy.patcher_extension import WrappersMP

from guidance_kit.nodes.composable import (
    ComposableConcept,
    ComposableGuider,
    ComposableModelPatch,
    ComposablePrompt,
    patch_model,
)
from guidance_kit.nodes.contract.stats import stats_sink
from guidance_kit.samplers.composable import ConvergenceTracker, combine_step, compose, plan_step
from harness.executor import run_node
from harness.sampling import cfg_guider, ksample, sample_guider

STEPS = 4
NAN = float("nan")


def composition(*concepts):
    """Chain Composable Concept nodes over (conditioning, weight) pairs."""
    out = None
    for conditioning, weight in concepts:
        out = run_node(ComposableConcept, conditioning, weight, out)[0]
    return out


def guider(model, positive, negative, cfg, threshold=1.0):
    return run_node(ComposableGuider, model, positive, negative, cfg, threshold)[0]


def other_prompt(tiny, seed=11, tokens=8):
    like = tiny.positive[0]
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, like[0].shape[-1], generator=generator), dict(like[1])]]


def assert_close(got, expected):
    """Equal up to float32 rounding (the latents of the eps families reach hundreds)."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def count_model_calls(patcher) -> list:
    calls = []

    def wrapper(executor, x, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return executor(x, *args, **kwargs)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.count_calls", wrapper)
    return calls


# ---------------------------------------------------------------- the rule (pure)

def test_compose_one_concept_with_weight_cfg_is_the_cfg_formula_exactly():
    uncond, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(compose(uncond, [cond], [7.0]), uncond + (cond - uncond) * 7.0)
    assert torch.equal(compose(uncond, [cond], [1.0]), cond)


def test_compose_not_is_the_explicit_formula():
    uncond, a, b = torch.randn(3, 2, 3, 8, 8)
    expected = uncond + 5.0 * (a - uncond) - 2.5 * (b - uncond)
    assert torch.allclose(compose(uncond, [a, b], [5.0, -2.5]), expected, atol=1e-6)
    per_sample = compose(uncond, [a, b], [torch.tensor([5.0, 0.0]), torch.tensor([-2.5, -2.5])])
    assert torch.allclose(per_sample[0], expected[0], atol=1e-6)
    assert torch.allclose(per_sample[1], (uncond - 2.5 * (b - uncond))[1], atol=1e-6)


def test_tracker_switches_per_concept_per_sample_keyed_to_the_noise_level():
    tracker = ConvergenceTracker(0.9)
    assert tracker.guiding(5.0, 2, 2).all()
    cosine = torch.tensor([[0.95, 0.5], [NAN, 0.99]])
    assert tracker.observe(5.0, cosine, ~cosine.isnan()) == []
    assert tracker.guiding(4.0, 2, 2).tolist() == [[False, True], [True, False]]
    cosine = torch.tensor([[NAN, 0.91], [0.2, NAN]])
    assert tracker.observe(4.0, cosine, ~cosine.isnan()) == [0]
    assert tracker.guiding(3.0, 2, 2).tolist() == [[False, False], [True, False]]
    assert tracker.guiding(6.0, 2, 2).all()  # above every switch: guided again


def test_converged_samples_continue_on_the_lead_concept_alone():
    uncond, a, b = torch.randn(3, 2, 3, 4, 4)
    plan = plan_step(torch.tensor([[True, False], [False, False]]), lead=1)
    assert plan.concept_rows == [True, True] and plan.uncond_row
    guided, base = combine_step(plan, uncond, [a, b], [2.0, 1.0])
    assert torch.equal(guided[1], b[1]) and torch.equal(base[1], b[1])
    assert torch.allclose(guided[0], (uncond + 2.0 * (a - uncond))[0]) and torch.equal(base[0], uncond[0])
    alone = plan_step(torch.zeros(2, 2, dtype=torch.bool), lead=0)
    assert alone.concept_rows == [True, False] and not alone.uncond_row


# ---------------------------------------------------------------- in ComfyUI

def test_one_concept_of_weight_one_is_plain_cfg_exactly_on_every_family(tiny):
    latent = tiny.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(tiny.patcher, tiny.positive, tiny.negative, 5.0), latent, steps=STEPS, seed=3)
    got = sample_guider(guider(tiny.patcher, composition((tiny.positive, 1.0)), tiny.negative, 5.0), latent,
                        steps=STEPS, seed=3)
    plain = sample_guider(guider(tiny.patcher, tiny.positive, tiny.negative, 5.0), latent, steps=STEPS, seed=3)
    assert torch.equal(got, expected) and torch.equal(plain, expected)


def test_weight_equal_to_cfg_at_cfg_one_is_plain_cfg(tiny_eps):
    latent = tiny_eps.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 6.0), latent,
                             steps=STEPS, seed=1)
    got = sample_guider(guider(tiny_eps.patcher, composition((tiny_eps.positive, 6.0)), tiny_eps.negative, 1.0),
                        latent, steps=STEPS, seed=1)
    assert_close(got, expected)


class ExplicitComposition(comfy.samplers.CFGGuider):
    """Reference: uncond + cfg * sum_i w_i (cond_i - uncond), each concept evaluated on its own."""

    def set_concepts(self, concepts, negative, cfg):
        self.inner_set_conds({"negative": negative, **{f"c{i}": c for i, (c, _) in enumerate(concepts)}})
        self.weights, self.cfg = [w for _, w in concepts], cfg

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        calc = comfy.samplers.calc_cond_batch
        uncond = calc(self.inner_model, [self.conds["negative"]], x, timestep, model_options)[0]
        total = sum(w * (calc(self.inner_model, [self.conds[f"c{i}"]], x, timestep, model_options)[0] - uncond)
                    for i, w in enumerate(self.weights))
        return uncond + self.cfg * total


def test_and_not_match_the_explicit_formula(tiny):
    a, b = tiny.positive, other_prompt(tiny)
    latent = tiny.empty_latent(batch=2)
    reference = ExplicitComposition(tiny.patcher)
    reference.set_concepts([(a, 1.0), (b, -0.5)], tiny.negative, 4.0)
    expected = sample_guider(reference, latent, steps=STEPS, seed=2)
    got = sample_guider(guider(tiny.patcher, composition((a, 1.0), (b, -0.5)), tiny.negative, 4.0), latent,
                        steps=STEPS, seed=2)
    assert_close(got, expected)


def test_rows_per_step_are_concepts_plus_one_in_one_model_call(tiny_eps):
    concepts = [(tiny_eps.positive, 1.0), (other_prompt(tiny_eps, 1), 0.5), (other_prompt(tiny_eps, 2), -1.0)]
    composed = guider(tiny_eps.patcher, composition(*concepts), tiny_eps.negative, 3.0)
    calls = count_model_calls(composed.model_patcher)
    sample_guider(composed, tiny_eps.empty_latent(batch=2), steps=STEPS)
    run = stats_sink(composed.model_patcher).last
    assert [e.rows for e in run.evaluations] == [8] * STEPS
    assert [e.baseline_rows for e in run.evaluations] == [8] * STEPS
    assert calls == [8] * STEPS
    assert run.evaluations[0].signals["weights"] == [1.0, 0.5, -1.0]
    assert run.evaluations[0].signals["concept_rows"] == [2, 2, 2]


def test_concepts_that_cannot_be_batched_fall_back_to_separate_calls(tiny_eps):
    long_prompt = other_prompt(tiny_eps, 3, tokens=40)  # 8 vs 40 tokens: beyond ComfyUI's padding limit
    composed = guider(tiny_eps.patcher, composition((tiny_eps.positive, 1.0), (long_prompt, 1.0)), tiny_eps.negative,
                      3.0)
    calls = count_model_calls(composed.model_patcher)
    got = sample_guider(composed, tiny_eps.empty_latent(batch=1), steps=2)
    reference = ExplicitComposition(tiny_eps.patcher)
    reference.set_concepts([(tiny_eps.positive, 1.0), (long_prompt, 1.0)], tiny_eps.negative, 3.0)
    expected = sample_guider(reference, tiny_eps.empty_latent(batch=1), steps=2)
    assert sorted(calls) == [1, 1, 2, 2]
    assert_close(got, expected)


def test_ksampler_with_the_patch_equals_the_guider(tiny):
    composed = composition((tiny.positive, 1.0), (other_prompt(tiny), -0.5))
    latent = tiny.empty_latent(batch=2)
    for cfg in (4.0, 1.0) if tiny.family == "sd15_eps" else (4.0,):
        expected = sample_guider(guider(tiny.patcher, composed, tiny.negative, cfg), latent, steps=STEPS, seed=4)
        patched = run_node(ComposableModelPatch, tiny.patcher, 1.0)[0]
        got = ksample(patched, composed, tiny.negative, latent, cfg=cfg, steps=STEPS, seed=4)
        assert torch.equal(got, expected)
        assert stats_sink(patched).last.evaluations[0].rows == 3 * 2  # cfg 1 still evaluates the unconditional


def test_area_and_mask_apply_to_their_concept_only(tiny_eps):
    """One Euler step from pure noise: outside a concept's area (or mask) the result is as if the
    concept were absent."""
    base, extra = tiny_eps.positive, other_prompt(tiny_eps)
    in_area = node_helpers.conditioning_set_values(extra, {"area": (4, 8, 0, 0), "strength": 1.0,  # top half
                                                           "set_area_to_bounds": False})
    mask = torch.zeros(1, 8, 8)
    mask[:, :, :4] = 1.0  # left half
    masked = node_helpers.conditioning_set_values(extra, {"mask": mask, "set_area_to_bounds": False,
                                                          "mask_strength": 1.0})
    latent = tiny_eps.empty_latent(batch=1)
    alone = sample_guider(guider(tiny_eps.patcher, composition((base, 1.0)), tiny_eps.negative, 3.0), latent, steps=1)
    for local, outside in ((in_area, (slice(None), slice(None), slice(4, None), slice(None))),
                           (masked, (slice(None), slice(None), slice(None), slice(4, None)))):
        got = sample_guider(guider(tiny_eps.patcher, composition((base, 1.0), (local, 2.0)), tiny_eps.negative, 3.0),
                            latent, steps=1)
        assert torch.allclose(got[outside], alone[outside], atol=1e-5)
        assert not torch.allclose(got, alone, atol=1e-3)


def test_a_concept_outside_its_timestep_range_costs_no_rows(tiny_eps):
    late = node_helpers.conditioning_set_values(other_prompt(tiny_eps), {"start_percent": 0.6, "end_percent": 1.0})
    composed = guider(tiny_eps.patcher, composition((tiny_eps.positive, 1.0), (late, 1.0)), tiny_eps.negative, 3.0)
    sample_guider(composed, tiny_eps.empty_latent(batch=1), steps=STEPS)
    rows = [e.rows for e in stats_sink(composed.model_patcher).last.evaluations]
    assert rows[0] == 2 and rows[-1] == 3


def test_adaptive_guidance_drops_converged_concepts(tiny):
    """A concept identical to the unconditional converges at once: it stops costing rows and the
    result is the composition without it."""
    latent = tiny.empty_latent(batch=2)
    same_as_uncond = composition((tiny.positive, 1.0), (tiny.negative, 1.0))
    composed = guider(tiny.patcher, same_as_uncond, tiny.negative, 4.0, threshold=0.9999999)
    got = sample_guider(composed, latent, steps=STEPS, seed=5)
    run = stats_sink(composed.model_patcher).last
    assert [e.rows for e in run.evaluations] == [6] + [4] * (STEPS - 1)
    assert run.baseline_rows == 6 * STEPS and run.events[0] == (0, "concept 2 converged")
    expected = sample_guider(cfg_guider(tiny.patcher, tiny.positive, tiny.negative, 4.0), latent, steps=STEPS, seed=5)
    assert_close(got, expected)


def test_state_is_fresh_each_run_and_the_last_concept_continues_alone(tiny_eps):
    latent = tiny_eps.empty_latent(batch=2)
    only = guider(tiny_eps.patcher, composition((tiny_eps.negative, 1.0)), tiny_eps.negative, 4.0, threshold=0.9999999)
    first = sample_guider(only, latent, steps=STEPS, seed=5)
    assert [e.rows for e in stats_sink(only.model_patcher).last.evaluations] == [4] + [2] * (STEPS - 1)
    again = sample_guider(only, latent, steps=STEPS, seed=5)
    assert torch.equal(again, first)
    assert [e.rows for e in stats_sink(only.model_patcher).last.evaluations] == [4] + [2] * (STEPS - 1)


def test_one_concept_with_a_threshold_is_adaptive_guidance(tiny_eps):
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceGuider

    latent = tiny_eps.empty_latent(batch=2)
    ag = run_node(AdaptiveGuidanceGuider, tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 5.0, 0.999,
                                        "denoised", 0.0, 1.0)[0]
    expected = sample_guider(ag, latent, steps=6, seed=7)
    composed = guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 5.0, threshold=0.999)
    got = sample_guider(composed, latent, steps=6, seed=7)
    ag_rows = [e.rows for e in stats_sink(ag.model_patcher).last.evaluations]
    assert ag_rows != [4] * 6  # it did switch
    assert [e.rows for e in stats_sink(composed.model_patcher).last.evaluations] == ag_rows
    assert_close(got, expected)


def test_a_previous_calc_cond_batch_function_is_chained_and_the_input_model_untouched(tiny_eps):
    seen = []

    def foreign(args):
        seen.append([c is not None for c in args["conds"]])
        return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                              args["model_options"])
    model = tiny_eps.patcher.clone()
    model.set_model_sampler_calc_cond_batch_function(foreign)
    options_before = dict(model.model_options)
    twice = patch_model(patch_model(model, threshold=1.0), threshold=0.99)
    composed = composition((tiny_eps.positive, 1.0), (other_prompt(tiny_eps), 1.0))
    ksample(twice, composed, tiny_eps.negative, tiny_eps.empty_latent(1), cfg=3.0, steps=2)
    assert seen == [[True, True], [True, False]] * 2  # ComfyUI's own pairs, never three lists
    assert model.model_options == options_before and model.wrappers.get(WrappersMP.OUTER_SAMPLE) is None


class StubClip:
    """Encodes text as a tensor derived from its characters (enough to see which part went where)."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        codes = torch.tensor([float(ord(c)) for c in tokens[:8].ljust(8)])
        return [[codes.view(1, 8, 1).expand(1, 8, 64).clone(), {"text": tokens}]]


def test_prompt_node_encodes_each_concept_with_its_weight():
    composed = run_node(ComposablePrompt, StubClip(), "a red circle AND a blue square :0.8 AND NOT green", 2.0)[0]
    assert [options["text"] for _, options in composed] == ["a red circle", "a blue square", "green"]
    assert [options["guidance_kit_concept_weight"] for _, options in composed] == [2.0, 0.8, -2.0]
    assert len({options["guidance_kit_concept"] for _, options in composed}) == 3


@pytest.mark.parametrize("call, message", [
    (lambda t: guider(t.patcher, [], t.negative, 4.0), "'composition' has no concepts"),
    (lambda t: guider(t.patcher, composition((t.positive, 0.0)), t.negative, 4.0), "every concept weight is 0"),
    (lambda t: guider(t.patcher, t.positive, composition((t.negative, 1.0)), 4.0), "'negative' is a composition"),
    (lambda t: guider(t.patcher, composition((t.positive, 1.0), ([[torch.zeros(1, 8, 32), {}]], 1.0)), t.negative,
                      4.0), "concept 2's conditioning is 32 wide"),
    (lambda t: guider(t.patcher, t.positive, t.negative, 4.0, threshold=1.5),
     "Composable: 'threshold' must be a finite number in (0, 1]"),
    (lambda t: run_node(ComposableConcept, composition((t.positive, 1.0)), 1.0, None), "already a composition"),
    (lambda t: run_node(ComposablePrompt, StubClip(), "a AND AND b", 1.0),
     "'text': empty concept before 'AND' at position 6"),
    (lambda t: run_node(ComposablePrompt, StubClip(), "a :0 AND b :0", 1.0), "every concept weight is 0"),
])
def test_clear_errors(tiny_eps, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(tiny_eps)
