"""Run Stats node: the last sampling run of a Guidance Kit guider or model, as a plot and a summary.

The stats come from the sink that ``attach_run_stats`` put on the technique's patched model
(``stats_sink``); the LATENT input only orders this node after the sampler that used it.  The
drawing is ``samplers/stats_plot.py``.
"""
import numpy as np
import torch

from comfy_api.latest import io, ui

from ..samplers.stats_plot import plot_run
from .contract import stats_sink

CATEGORY = "Guidance Kit"


class RunStatsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitRunStats",
            display_name="Run Stats (Guidance Kit)",
            category=CATEGORY,
            description="Plots what the last sampling run of a Guidance Kit guider (or patched model) did: "
                        "model rows per step against plain CFG, the noise level, the technique's signals and "
                        "its decisions, plus a one-line summary.",
            inputs=[
                io.MultiType.Input("source", types=[io.Guider, io.Model],
                                   tooltip="The GUIDER (or MODEL) from a Guidance Kit technique node, the same "
                                           "one the sampler used."),
                io.Latent.Input("latent", tooltip="The sampler's output latent: only makes this node run after "
                                                  "the sampler (its values are not used)."),
            ],
            outputs=[io.Image.Output(display_name="plot"), io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, source, latent) -> io.NodeOutput:
        patcher = getattr(source, "model_patcher", source)  # a GUIDER's model, or the MODEL itself
        sink = stats_sink(patcher) if hasattr(patcher, "get_attachment") else None
        if sink is None:
            raise ValueError("Run Stats: 'source' carries no Guidance Kit stats; connect the GUIDER or MODEL "
                             "output of a Guidance Kit technique node")
        if sink.last is None:
            raise ValueError(f"Run Stats: no finished sampling run of this {sink.technique} source yet; connect "
                             "the output latent of the sampler that used it to 'latent'")
        run = sink.last
        pixels = np.asarray(plot_run(run), dtype=np.float32) / 255.0
        plot = torch.from_numpy(pixels)[None]
        summary = run.summary()
        return io.NodeOutput(plot, summary, ui=ui.PreviewImage(plot, cls=cls).as_dict() | {"text": [summary]})


NODES = [RunStatsNode]
