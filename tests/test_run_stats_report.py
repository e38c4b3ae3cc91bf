"""What a run reports: summary wording, schedule positions, the plot image, the Run Stats node, and
the run summary sent to the browser (in the server only, never breaking sampling)."""
import sys
import types

import pytest
import torch

from harness.executor import run_node
from harness.sampling import ksample, sample_guider


def hand_made_run(events=(), steps=20):
    """An AG-like run at batch 2: 4 rows per step, 2 once switched to conditional only at step 9."""
    from guidance_kit.samplers.run_record import RunStats

    run = RunStats("AG")
    run.sigmas = [1.0 - i / steps for i in range(steps + 1)]
    for i in range(steps):
        evaluation = run.begin_evaluation(run.sigmas[i])
        evaluation.rows, evaluation.baseline_rows = (2 if i >= 8 else 4), 4
        run.signal(cosine=torch.tensor([0.9 + 0.004 * i, 0.91 + 0.004 * i]), threshold=0.95)
        if i in events:
            run.mark("cond only")
    return run


def marker_columns(image) -> list[list[int]]:
    """Groups of adjacent pixel columns crossed by a decision marker (a long run of its colour: the
    labels' short strokes do not count)."""
    import numpy as np

    from guidance_kit.samplers.stats_plot import MARKER_COLOR

    marked = (np.asarray(image) == MARKER_COLOR).all(axis=-1).sum(axis=0)
    columns = np.flatnonzero(marked >= image.height // 4)
    groups = []
    for column in columns.tolist():
        if groups and column - groups[-1][-1] <= 3:
            groups[-1].append(column)
        else:
            groups.append([column])
    return groups


def test_summary_wording():
    from guidance_kit.samplers.run_record import RunStats

    cfg = RunStats("CFG", sigmas=[1.0, 0.5, 0.0])
    for sigma in (1.0, 0.5):
        cfg.begin_evaluation(sigma).rows = 2
    assert cfg.summary() == "CFG: 2 steps, 4 model rows"
    expected = "AG: 20 steps, 56 model rows, 24 of 80 saved vs CFG; cond only at step 9/20"
    assert hand_made_run(events=(8,)).summary() == expected
    assert hand_made_run(events=(8, 12)).summary().endswith("cond only at step 9/20 (+1 more decisions)")
    stacked = hand_made_run(events=(8,))
    for evaluation in stacked.evaluations[:3]:
        evaluation.acted += ["AG", "PPAP"]
    assert stacked.summary() == expected + "; also acting: PPAP"


def test_tensor_signals_are_stored_as_lists():
    signals = hand_made_run().evaluations[3].signals
    assert isinstance(signals["cosine"], list) and signals["cosine"] == pytest.approx([0.912, 0.922])


def test_evaluations_sit_at_their_schedule_position(tiny_eps):
    from guidance_kit.nodes.contract.stats import attach_run_stats

    model = tiny_eps.patcher.clone()
    sink = attach_run_stats(model, "CFG")
    ksample(model, tiny_eps.positive, tiny_eps.negative, tiny_eps.empty_latent(), cfg=4.0, steps=4, sampler="heun")
    run = sink.last
    assert [run.position(i) for i in range(len(run.evaluations))] == [0, 1, 1, 2, 2, 3, 3]
    assert [run.step_of(i) for i in range(len(run.evaluations))] == [1, 2, 2, 3, 3, 4, 4]
    assert run.summary() == "CFG: 4 steps (7 model evaluations), 14 model rows"


def test_plot_is_drawn_without_markers_when_nothing_was_decided():
    from PIL import ImageStat

    from guidance_kit.samplers.stats_plot import HEIGHT, WIDTH, plot_run

    image = plot_run(hand_made_run())
    assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
    assert max(ImageStat.Stat(image).stddev) > 20, "blank plot"
    assert marker_columns(image) == []


def test_plot_marks_each_decision_where_it_happened():
    from guidance_kit.samplers.stats_plot import LEFT, RIGHT, WIDTH, plot_run

    groups = marker_columns(plot_run(hand_made_run(events=(4, 15))))
    assert len(groups) == 2
    early, late = [sum(g) / len(g) for g in groups]
    step_width = (WIDTH - RIGHT - LEFT) / 20
    assert (early - LEFT) / step_width == pytest.approx(4.5, abs=0.3)  # evaluation i is drawn mid-step i + 1
    assert (late - early) / step_width == pytest.approx(11, abs=0.3)


def test_plot_of_a_run_with_no_evaluations():
    from guidance_kit.samplers.run_record import RunStats
    from guidance_kit.samplers.stats_plot import plot_run

    assert plot_run(RunStats("CFG"), size=(320, 200)).size == (320, 200)


def test_run_stats_node_plots_a_reference_guider_run(tiny_eps):
    from guidance_kit.nodes.contract.stats import stats_sink
    from guidance_kit.nodes.reference_guider import ReferenceCFGGuider
    from guidance_kit.nodes.run_stats_node import RunStatsNode

    guider = run_node(ReferenceCFGGuider, tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 5.0)[0]
    latent = {"samples": sample_guider(guider, tiny_eps.empty_latent(batch=2), steps=6)}
    output = run_node(RunStatsNode, guider, latent)
    plot, summary = output.result
    assert plot.shape == (1, 512, 768, 3) and plot.dtype == torch.float32
    assert 0.0 <= plot.min() < plot.max() <= 1.0
    assert summary == stats_sink(guider.model_patcher).last.summary() == "CFG: 6 steps, 24 model rows"
    assert output.ui["text"] == [summary] and len(output.ui["images"]) == 1


def test_run_stats_node_accepts_a_patched_model(tiny_eps):
    from guidance_kit.nodes.contract.stats import attach_run_stats
    from guidance_kit.nodes.run_stats_node import RunStatsNode

    model = tiny_eps.patcher.clone()
    attach_run_stats(model, "patched")
    samples = ksample(model, tiny_eps.positive, tiny_eps.negative, tiny_eps.empty_latent(), cfg=1.0, steps=3)
    assert run_node(RunStatsNode, model, {"samples": samples}).result[1] == "patched: 3 steps, 3 model rows"


def test_run_stats_node_names_what_is_wrong(tiny_eps):
    from guidance_kit.nodes.reference_guider import ReferenceCFGGuider
    from guidance_kit.nodes.run_stats_node import RunStatsNode

    latent = tiny_eps.empty_latent()
    with pytest.raises(ValueError, match="Run Stats: 'source' carries no Guidance Kit stats"):
        run_node(RunStatsNode, tiny_eps.patcher, latent)
    fresh = run_node(ReferenceCFGGuider, tiny_eps.patcher, tiny_eps.positive, tiny_eps.negative, 5.0)[0]
    with pytest.raises(ValueError, match="Run Stats: no finished sampling run"):
        run_node(RunStatsNode, fresh, latent)


class FakePromptServer:
    def __init__(self, client_id="browser-1", fail=False):
        self.client_id, self.fail, self.sent = client_id, fail, []

    def send_sync(self, event, data, sid=None):
        if self.fail:
            raise ConnectionError("socket closed")
        self.sent.append((event, data, sid))


@pytest.fixture
def prompt_server(monkeypatch):
    """Stand in for ComfyUI's ``server`` module as the server process has it (PromptServer.instance)."""
    def install(**kwargs):
        fake = FakePromptServer(**kwargs)
        module = types.ModuleType("server")
        module.PromptServer = type("PromptServer", (), {"instance": fake})
        monkeypatch.setitem(sys.modules, "server", module)
        return fake
    return install


def test_no_announcement_outside_the_server(tiny_eps, monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert sample_with_stats(tiny_eps, "12").last.rows == 6


def sample_with_stats(tiny, node_id):
    from guidance_kit.nodes.contract.stats import attach_run_stats

    model = tiny.patcher.clone()
    sink = attach_run_stats(model, "CFG", node_id)
    ksample(model, tiny.positive, tiny.negative, tiny.empty_latent(), cfg=4.0, steps=3)
    return sink


def test_finished_run_is_announced_to_the_client_that_queued_it(tiny_eps, prompt_server):
    server = prompt_server()
    sink = sample_with_stats(tiny_eps, "12")
    assert server.sent == [("guidance_kit.run_summary",
                            {"node": "12", "technique": "CFG", "text": sink.last.summary(), "steps": 3, "rows": 6,
                             "baseline_rows": 6}, "browser-1")]


def test_no_announcement_without_node_or_client(tiny_eps, prompt_server):
    server = prompt_server()
    sample_with_stats(tiny_eps, None)
    assert server.sent == []
    server = prompt_server(client_id=None)
    sample_with_stats(tiny_eps, "12")
    assert server.sent == []


def test_ui_failure_never_breaks_sampling(tiny_eps, prompt_server):
    prompt_server(fail=True)
    sink = sample_with_stats(tiny_eps, "12")
    assert sink.last.rows == 6
