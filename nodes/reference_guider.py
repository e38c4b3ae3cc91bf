"""Reference CFG guider: ComfyUI's own CFG, with the run statistics every technique reports.

It is the baseline the techniques measure themselves against: identical output to the stock
CFGGuider (it *is* one, over a cloned model), plus model rows counted per evaluation.
"""
from comfy_api.latest import io

from .guiders import cfg_guider, guider_inputs
from .run_stats import attach_run_stats, node_id_of

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
        patched = model.clone()
        attach_run_stats(patched, "CFG", node_id_of(cls))
        guider = cfg_guider(patched, positive, negative, cfg)
        return io.NodeOutput(guider)


NODES = [ReferenceCFGGuider]
