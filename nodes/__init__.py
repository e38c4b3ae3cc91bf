"""ComfyUI adapters: thin ``io.ComfyNode`` classes over the math in ``samplers/``.

Each feature is one module in this folder exporting ``NODES`` (its node classes); the extension
registers every such module's nodes, so adding a technique means adding one file.
"""
import importlib
import pkgutil

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io


def node_classes() -> list[type[io.ComfyNode]]:
    classes = []
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        classes += getattr(module, "NODES", [])
    return classes


class GuidanceKitExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()
