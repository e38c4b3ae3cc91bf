"""Attach per-run statistics to a MODEL through ComfyUI's patcher-extension wrappers.

``attach_run_stats(model, technique)`` adds three keyed wrappers to the (already cloned) patcher:

* OUTER_SAMPLE: creates a fresh ``RunStats`` for every sampling run, stores it in that run's own
  copy of ``model_options`` and publishes it to the patcher's ``StatsSink`` when the run ends;
* PREDICT_NOISE: opens one ``Evaluation`` per guider call, whatever the guider;
* APPLY_MODEL: counts the batch rows that go through the diffusion model.

Other packs' wrappers are untouched (keys keep them apart).  No state survives a run except the
published report, which only readers (the stats node, tests, benchmarks) look at.

In the server, a finished run whose sink knows its workflow node is also announced to the browser
that queued the prompt (``RUN_SUMMARY_EVENT``, shown on that node by ``web/guidance_kit.js``).
"""
import logging
import sys

from comfy.patcher_extension import WrappersMP

from ...samplers.run_record import RunStats

logger = logging.getLogger(__name__)

WRAPPER_KEY = "guidance_kit.run_stats"
RUN_KEY = "guidance_kit.run"
RUN_SUMMARY_EVENT = "guidance_kit.run_summary"


class StatsSink:
    """Holds the report of the last finished run of a patched model.

    ``node_id`` is the workflow node that installed the stats (its summary is shown there)."""

    def __init__(self, technique: str, node_id: str | None = None):
        self.technique = technique
        self.node_id = node_id
        self.last: RunStats | None = None


def current_run(model_options: dict) -> RunStats | None:
    """The RunStats of the run these model_options belong to (None outside a stats-attached run)."""
    return model_options.get("transformer_options", {}).get(RUN_KEY)


def _outer_sample(sink: StatsSink):
    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        run = RunStats(sink.technique)
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        run.sigmas = [float(s) for s in sigmas]
        guider.model_options.setdefault("transformer_options", {})[RUN_KEY] = run
        try:
            return executor(*args, **kwargs)
        finally:
            sink.last = run
            _announce(sink, run)
    return wrapper


def _announce(sink: StatsSink, run: RunStats) -> None:
    """Send the run's summary to the browser that queued the prompt (only inside the server, only
    for a sink with a node id); a UI failure never breaks sampling."""
    server_module = sys.modules.get("server")  # imported by ComfyUI's main.py, absent in-process
    if sink.node_id is None or server_module is None:
        return
    try:
        server = getattr(server_module.PromptServer, "instance", None)
        if server is None or server.client_id is None:
            return
        server.send_sync(RUN_SUMMARY_EVENT, {"node": sink.node_id, "technique": run.technique, "text": run.summary(),
                                             "steps": run.steps, "rows": run.rows,
                                             "baseline_rows": run.baseline_rows}, server.client_id)
    except Exception:
        logger.warning("Guidance Kit: could not send the run summary to the UI", exc_info=True)


def _predict_noise(executor, x, timestep, model_options={}, seed=None):
    run = current_run(model_options)
    if run is not None:
        run.begin_evaluation(float(timestep.flatten()[0]))
    return executor(x, timestep, model_options, seed)


def _apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    run = transformer_options.get(RUN_KEY)
    if run is not None:
        run.count_rows(int(x.shape[0]), float(t.flatten()[0]))
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def attach_run_stats(model, technique: str, node_id: str | None = None) -> StatsSink:
    """Install the stats wrappers on ``model`` (a clone the caller owns) and return its sink.

    Installing again on a clone replaces only this pack's stats wrappers, so every technique node
    reports through its own sink while other wrappers stay chained.
    """
    sink = StatsSink(technique, node_id)
    for wrapper_type, wrapper in ((WrappersMP.OUTER_SAMPLE, _outer_sample(sink)),
                                  (WrappersMP.PREDICT_NOISE, _predict_noise),
                                  (WrappersMP.APPLY_MODEL, _apply_model)):
        model.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
        model.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, wrapper)
    model.set_attachments(WRAPPER_KEY, sink)
    return sink


def node_id_of(node_cls) -> str | None:
    """The executing workflow node's id (None when a node class is called outside the executor)."""
    hidden = getattr(node_cls, "hidden", None)
    return getattr(hidden, "unique_id", None)


def stats_sink(model) -> StatsSink | None:
    return model.get_attachment(WRAPPER_KEY)


def record_switches(run: RunStats | None, switched, score, measured, signal: str, describe) -> None:
    """Adaptive Guidance's run record of one evaluation: ``score`` per sample as the ``signal`` curve (None where it
    was not ``measured``) and a mark for each sample in ``switched``, labelled ``describe(score of the sample)``."""
    if run is None:
        return
    run.signal(**{signal: [float(v) if m else None for v, m in zip(score.tolist(), measured.tolist())]})
    for sample in switched:
        run.mark(f"sample {sample} switched to conditional only ({describe(float(score[sample]))})")
