"""Guidance Kit: guidance and sampling-acceleration techniques from recent papers, as ComfyUI nodes.

ComfyUI loads this file from ``custom_nodes/``.  Nodes are registered through the V3 extension
entry point.  The node modules (which import ComfyUI) are imported inside the entry point, so the
pure packages ``samplers`` and ``toyworld`` stay importable without ComfyUI (from diffusers, from
the training script, from pure tests).
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import GuidanceKitExtension

    return GuidanceKitExtension()
