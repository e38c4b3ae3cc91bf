"""Reference CFG guider: ComfyUI's own CFG, with the run statistics every technique reports.

It is the baseline the techniques measure themselves against: identical output to the stock
CFGGuider (it *is* one, over a cloned model), plus model rows counted per evaluation.
"""
from comfy_api.latest import io

from .contract import Technique, cfg_guider, check_number, guider_inputs, install, node_id_of

CATEGORY = "Guidance Kit"
NODE = "Reference CFG Guider"


class ReferenceCFG(Technique):
    """Plain CFG: nothing but the contract's run statistics."""

    node = NODE


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
        check_number(NODE, "cfg", cfg, 0.0, 100.0)
        return io.NodeOutput(cfg_guider(install(model, ReferenceCFG(), node_id_of(cls)), positive, negative, cfg))


NODES = [ReferenceCFGGuider]
