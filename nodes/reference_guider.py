"""Reference CFG guider: ComfyUI's own CFG, with the run statistics every technique reports.

It is the baseline the techniques measure themselves against: identical output to the stock
CFGGuider (it *is* one, over a cloned model), plus model rows counted per evaluation.
"""
from comfy_api.latest import io

from .guiders import cfg_guider, guider_inputs
from .patching import Technique, install
from .stats_wrappers import node_id_of

CATEGORY = "Guidance Kit"


class ReferenceCFGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitReferenceCFGGuider",
            display_name="Reference CFG Guider (Guidance Kit)",
            category=CATEGORY,
            description="Plain classifier-free guidance, identical to CFGGuider, that records "
                        "model rows per step: the baseline for every Guidance Kit technique.",
            inputs=guider_inputs(),
            outputs=[io.Guider.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg) -> io.NodeOutput:
        return io.NodeOutput(cfg_guider(install(model, Technique(), node_id_of(cls)), positive, negative, cfg))


NODES = [ReferenceCFGGuider]
