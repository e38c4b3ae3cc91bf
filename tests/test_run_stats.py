"""The model-row counter: per run, per evaluation, chained with other packs' wrappers and hooks."""
import pytest

import comfy.patcher_extension
from comfy.patcher_extension import WrappersMP

from harness.sampling import cfg_guider, ksample, sample_guider


@pytest.fixture
def counted(tiny_eps):
    from guidance_kit.nodes.contract.stats import attach_run_stats

    model = tiny_eps.patcher.clone()
    return model, attach_run_stats(model, "test")


def test_fresh_report_every_run(tiny_eps, counted):
    model, sink = counted
    ksample(model, tiny_eps.positive, tiny_eps.negative, tiny_eps.empty_latent(), cfg=4.0, steps=5)
    first = sink.last
    ksample(model, tiny_eps.positive, tiny_eps.negative, tiny_eps.empty_latent(), cfg=4.0, steps=3)
    assert sink.last is not first
    assert (len(first.evaluations), first.rows) == (5, 10)
    assert (len(sink.last.evaluations), sink.last.rows) == (3, 6)


def test_cfg_one_counts_one_row(tiny_eps, counted):
    model, sink = counted
    ksample(model, tiny_eps.positive, tiny_eps.negative, tiny_eps.empty_latent(batch=2), cfg=1.0, steps=4)
    assert [e.rows for e in sink.last.evaluations] == [2] * 4


def test_heun_opens_an_evaluation_per_model_call(tiny_eps, counted):
    model, sink = counted
    ksample(model, tiny_eps.positive, tiny_eps.negative, tiny_eps.empty_latent(), cfg=4.0, steps=4, sampler="heun")
    assert len(sink.last.evaluations) == 7  # Heun: two calls per step, one on the last step
    assert sink.last.rows == 14


def test_chains_with_other_wrappers_and_model_function_wrapper(tiny_eps, counted):
    model, sink = counted
    calls = {"apply": 0, "function": 0}

    def other_apply_wrapper(executor, *args, **kwargs):
        calls["apply"] += 1
        return executor(*args, **kwargs)

    def other_function_wrapper(apply_model, args):
        calls["function"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "another_pack", other_apply_wrapper)
    model.set_model_unet_function_wrapper(other_function_wrapper)
    ksample(model, tiny_eps.positive, tiny_eps.negative, tiny_eps.empty_latent(), cfg=4.0, steps=5)
    assert calls == {"apply": 5, "function": 5}
    assert sink.last.rows == 10


def test_reattaching_on_a_clone_keeps_separate_reports(tiny_eps, counted):
    from guidance_kit.nodes.contract.stats import attach_run_stats, stats_sink

    model, sink = counted
    downstream = model.clone()
    downstream_sink = attach_run_stats(downstream, "downstream")
    sample_guider(cfg_guider(downstream, tiny_eps.positive, tiny_eps.negative, 3.0), tiny_eps.empty_latent(), steps=4)
    assert sink.last is None
    assert downstream_sink.last.rows == 8 and downstream_sink.last.technique == "downstream"
    assert stats_sink(model) is sink
    assert len(comfy.patcher_extension.get_all_wrappers(WrappersMP.APPLY_MODEL, {"wrappers": downstream.wrappers})) == 1
