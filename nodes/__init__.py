"""ComfyUI adapters: thin ``io.ComfyNode`` classes over the math in ``samplers/``."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .reference_guider import ReferenceCFGGuider


class GuidanceKitExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [ReferenceCFGGuider]
