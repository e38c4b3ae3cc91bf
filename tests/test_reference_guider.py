"""The reference guider reproduces ComfyUI's CFGGuider exactly and counts model rows."""
import torch

from harness.executor import run_node
from harness.sampling import cfg_guider, sample_guider


def reference_guider(model, positive, negative, cfg):
    from guidance_kit.nodes.reference_guider import ReferenceCFGGuider

    return run_node(ReferenceCFGGuider, model, positive, negative, cfg)[0]


def test_identical_to_cfg_guider_on_every_family(tiny):
    latent = tiny.empty_latent(batch=2)
    expected = sample_guider(cfg_guider(tiny.patcher, tiny.positive, tiny.negative, 5.0), latent, steps=6, seed=3)
    guider = reference_guider(tiny.patcher, tiny.positive, tiny.negative, 5.0)
    got = sample_guider(guider, latent, steps=6, seed=3)
    assert torch.isfinite(expected).all() and expected.abs().sum() > 0
    assert torch.equal(got, expected)


def test_counts_two_rows_per_sample_per_step(tiny_eps):
    from guidance_kit.nodes.contract.stats import stats_sink

    guider = reference_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 7.0)
    sample_guider(guider, tiny_eps.empty_latent(batch=3), steps=20)
    run = stats_sink(guider.model_patcher).last
    assert len(run.evaluations) == 20
    assert [e.rows for e in run.evaluations] == [6] * 20
    assert run.rows == 120 and run.rows_saved == 0
    assert run.sigmas[0] > run.sigmas[-1] == 0.0


def test_input_model_is_not_modified(tiny_eps):
    wrappers_before = {k: dict(v) for k, v in tiny_eps.patcher.wrappers.items()}
    reference_guider(tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 7.0)
    assert tiny_eps.patcher.wrappers == wrappers_before
    assert tiny_eps.patcher.get_attachment("guidance_kit.run_stats") is None
