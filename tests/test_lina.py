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


# ---------------------------------------------------------------- targeted guidance, guiders, predictor

RELATION = "a red circle left of a blue square"


def lina_nodes():
    from guidance_kit.nodes import lina

    return lina


def test_targeted_guidance_is_cfg_plus_prompt_and_masked_latent_terms():
    from guidance_kit.samplers.lina import relation_mask, targeted_guidance

    generator = torch.Generator().manual_seed(0)
    cond, uncond, ablated = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(3))
    s_p, s_l, cfg = torch.tensor([1.5, 0.0]), torch.tensor([0.5, 2.0]), 4.0
    guided, same_uncond = targeted_guidance(cond, uncond, ablated, cfg, s_p, s_l)
    combined = same_uncond + cfg * (guided - same_uncond)
    mask = (cond - ablated).abs().mean(1, keepdim=True)
    mask = mask / mask.flatten(1).amax(1).view(-1, 1, 1, 1)
    expected = uncond + cfg * (cond - uncond) + s_p.view(-1, 1, 1, 1) * (cond - ablated) \
        + s_l.view(-1, 1, 1, 1) * mask * (cond - uncond)
    torch.testing.assert_close(combined, expected)
    torch.testing.assert_close(relation_mask(cond, ablated), mask)
    assert float(relation_mask(cond, cond).abs().max()) == 0.0


def test_relation_prompt_removes_the_given_words_or_the_top_ranked_ones(toy):
    lina = lina_nodes()
    ablated, removed = run_node(lina.LINARelationPrompt, toy.clip, RELATION, "left of", 2)
    torch.testing.assert_close(ablated[0][0], toy.encode("a red circle a blue square")[0][0])
    assert removed == "left of"
    ranking = lina.rank_words(toy.clip, RELATION)
    assert [score for _, score in ranking] == sorted((score for _, score in ranking), reverse=True)
    _, auto_removed = run_node(lina.LINARelationPrompt, toy.clip, RELATION, "", 2)
    assert auto_removed.split(", ") == [word for word, _ in ranking[:2]]
    with pytest.raises(ValueError, match=r"^LINA Relation Prompt, after LINA: 'words' 'above'"):
        run_node(lina.LINARelationPrompt, toy.clip, RELATION, "above", 2)
    with pytest.raises(ValueError, match=r"^LINA Relation Prompt, after LINA: 'text'"):
        run_node(lina.LINARelationPrompt, toy.clip, "  ", "", 2)


def relation_conds(toy):
    lina = lina_nodes()
    return toy.encode(RELATION), run_node(lina.LINARelationPrompt, toy.clip, RELATION, "left of", 2)[0]


def sample_and_stats(toy, guider, sigmas):
    from guidance_kit.nodes.contract.stats import stats_sink

    samples = run_node(SamplerCustomAdvanced, Noise_RandomNoise(0), guider, comfy.samplers.sampler_object("euler"),
                       sigmas, toy.latent(2))[0]["samples"]
    sink = stats_sink(guider.model_patcher)
    return samples, sink.last if sink is not None else None


def test_lina_patch_guides_in_its_window_only_and_reports_it(toy):
    lina = lina_nodes()
    positive, ablated = relation_conds(toy)
    sigmas = sigmas_for(toy.model, 6, "simple")
    base, _ = sample_and_stats(toy, cfg_guider(toy.model, positive, toy.negative, 4.0), sigmas)
    off = run_node(lina.LINAModelPatch, toy.model, ablated, 0.0, 0.0, 0.5)[0]
    torch.testing.assert_close(sample_and_stats(toy, cfg_guider(off, positive, toy.negative, 4.0), sigmas)[0], base)
    patched = run_node(lina.LINAModelPatch, toy.model, ablated, 2.0, 1.0, 0.5)[0]
    samples, run = sample_and_stats(toy, cfg_guider(patched, positive, toy.negative, 4.0), sigmas)
    assert float((samples - base).abs().max()) > 1e-3, "the targeted guidance did not change the image"
    window_sigma = boundary_sigma(toy.model, 0.5)
    inside = int((sigmas[:-1] >= window_sigma).sum())
    assert 0 < inside < 6 and run.rows == 2 * (2 * 6 + inside), "one extra row per sample inside the window"
    guided = [e for e in run.evaluations if "prompt_strength" in e.signals]
    assert len(guided) == inside and guided[0].signals["prompt_strength"] == [2.0, 2.0]
    assert any(label.startswith("LINA set: prompt_strength 2") for _, label in run.events)


def test_lina_guider_samples_on_the_causality_aware_schedule(toy):
    from guidance_kit.samplers.lina import causality_aware_schedule

    lina = lina_nodes()
    positive, ablated = relation_conds(toy)
    base = sigmas_for(toy.model, 8, "simple")
    guider = run_node(lina.LINAGuider, toy.model, positive, toy.negative, 4.0, ablated, 1.0, 0.0, 0.3, 0.6, 0.2)[0]
    _, run = sample_and_stats(toy, guider, base)
    expected = causality_aware_schedule(base, 0.6, boundary_sigma(toy.model, 0.2))
    torch.testing.assert_close(torch.tensor(run.sigmas), expected.float(), rtol=1e-5, atol=1e-6)


def test_manual_inputs_and_ablated_width_are_checked(toy):
    lina = lina_nodes()
    positive, ablated = relation_conds(toy)
    with pytest.raises(ValueError, match=r"^LINA, after LINA: 'prompt_strength'"):
        run_node(lina.LINAModelPatch, toy.model, ablated, 5.0, 0.0, 0.5)
    with pytest.raises(ValueError, match=r"^LINA Guider, after LINA: 'share'"):
        run_node(lina.LINAGuider, toy.model, positive, toy.negative, 4.0, ablated, 1.0, 0.0, 0.3, 1.5, 0.2)
    narrow = [[ablated[0][0][..., :64], dict(ablated[0][1])]]
    patched = run_node(lina.LINAModelPatch, toy.model, narrow, 1.0, 0.0, 0.5)[0]
    with pytest.raises(ValueError, match=r"LINA, after LINA: 'ablated' has width 64, the positive has 128"):
        sample_and_stats(toy, cfg_guider(patched, positive, toy.negative, 4.0), sigmas_for(toy.model, 3, "simple"))


def test_predictor_trains_through_the_training_core_and_resumes(tmp_path):
    from guidance_kit.samplers import lina, training

    generator = torch.Generator().manual_seed(0)
    features, targets = torch.randn(12, 16, generator=generator), torch.rand(12, 4, generator=generator)
    settings = training.TrainSettings(steps=120, batch_size=8, lr=1e-2)
    predictor, identity, result = lina.fit_predictor(features, targets, settings, model="m")
    assert result.losses[-1] < 0.5 * result.losses[0]
    checkpoint = tmp_path / "ckpt.safetensors"
    steps_seen = []
    _, _, stopped = lina.fit_predictor(features, targets, settings, model="m", checkpoint=checkpoint,
                                       on_step=lambda step, total, loss: steps_seen.append(step),
                                       should_stop=lambda step: step == 50)
    assert not stopped.completed and steps_seen == list(range(1, 51))
    resumed, _, again = lina.fit_predictor(features, targets, settings, model="m", checkpoint=checkpoint)
    assert again.completed and again.step == 120 and again.losses == result.losses
    torch.testing.assert_close(resumed.unit(features), predictor.unit(features))
    assert identity == lina.predictor_identity(16, 32, "m")


def write_predictor(folder, name, width, model):
    from guidance_kit.samplers import lina, training

    settings = training.TrainSettings(steps=2, batch_size=2)
    predictor, identity, result = lina.fit_predictor(torch.randn(4, width), torch.rand(4, 4), settings, model=model)
    training.save_trained(folder / name, {"predictor": predictor}, lina.PREDICTOR_FORMAT, identity, settings, result)


def test_auto_node_applies_the_prediction_and_refuses_a_mismatched_predictor(toy, tmp_path, monkeypatch):
    import folder_paths

    from guidance_kit.nodes.contract import model_identity

    lina = lina_nodes()
    positive, ablated = relation_conds(toy)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "lina", ([str(tmp_path)], {".safetensors"}))
    folder_paths.filename_list_cache.pop("lina", None)
    write_predictor(tmp_path, "mine.safetensors", 128, model_identity(toy.model))
    write_predictor(tmp_path, "other_model.safetensors", 128, "another")
    write_predictor(tmp_path, "other_width.safetensors", 64, model_identity(toy.model))
    patched = run_node(lina.LINAAutoModelPatch, toy.model, ablated, "mine.safetensors")[0]
    _, run = sample_and_stats(toy, cfg_guider(patched, positive, toy.negative, 4.0), sigmas_for(toy.model, 4, "simple"))
    assert any(label.startswith("LINA predicted: share") for _, label in run.events)
    for name in ("other_model.safetensors", "other_width.safetensors"):
        with pytest.raises(ValueError, match=r"^LINA Auto, after LINA: 'predictor': .* was written for another model"):
            run_node(lina.LINAAutoModelPatch, toy.model, ablated, name)
    with pytest.raises(ValueError, match=r"^LINA Auto Guider, after LINA: 'predictor' must be a file listed"):
        run_node(lina.LINAAutoGuider, toy.model, positive, toy.negative, 4.0, ablated, "../x.safetensors", 0.2)
