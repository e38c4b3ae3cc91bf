"""A technique's GUIDER node and its MODEL-patch twin from one list of inputs (``guider_and_patch``); both run
the same patched clone (the GUIDER is ComfyUI's CFGGuider over it)."""
from dataclasses import dataclass
from typing import Callable

from comfy_api.latest import io

from .checks import check_number
from .guiders import cfg_guider, guider_inputs, model_input
from .stats import node_id_of


@dataclass
class TwinSpec:
    """One technique's two nodes: ``patch(model, node_id, **options)`` returns the patched clone."""

    name: str                 # class-name stem: <name>Guider, <name>ModelPatch
    guider_id: str
    guider_display: str
    patch_id: str
    patch_display: str
    category: str
    guider_description: str
    patch_description: str
    options: Callable[[], list]
    patch: Callable
    guider_inputs: Callable[[], list] = guider_inputs  # model, positive, negative, cfg (in this order)
    model_tooltip: str | None = None
    check_guider: Callable | None = None  # (positive, negative, **options) -> None, raises ValueError


def guider_and_patch(spec: TwinSpec) -> tuple[type[io.ComfyNode], type[io.ComfyNode]]:
    """(GUIDER node, MODEL-patch node) of a technique, from one list of inputs."""
    where = spec.guider_display.removesuffix(" (Guidance Kit)")

    class Guider(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=spec.guider_id, display_name=spec.guider_display, category=spec.category,
                             description=spec.guider_description, inputs=[*spec.guider_inputs(), *spec.options()],
                             outputs=[io.Guider.Output()], hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, *args, **inputs) -> io.NodeOutput:
            inputs |= dict(zip([i.id for i in (*spec.guider_inputs(), *spec.options())], args))
            model, positive, negative, cfg = (inputs.pop(i.id) for i in spec.guider_inputs())
            check_number(where, "cfg", cfg, 0.0, 100.0)
            if spec.check_guider is not None:
                spec.check_guider(positive, negative, **inputs)
            return io.NodeOutput(cfg_guider(spec.patch(model, node_id_of(cls), **inputs), positive, negative, cfg))

    class ModelPatch(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=spec.patch_id, display_name=spec.patch_display, category=spec.category,
                             description=spec.patch_description,
                             inputs=[model_input(spec.model_tooltip), *spec.options()],
                             outputs=[io.Model.Output()], hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, model, *args, **options) -> io.NodeOutput:
            options |= dict(zip([i.id for i in spec.options()], args))
            return io.NodeOutput(spec.patch(model, node_id_of(cls), **options))

    for node, suffix in ((Guider, "Guider"), (ModelPatch, "ModelPatch")):
        node.__name__ = node.__qualname__ = f"{spec.name}{suffix}"
    return Guider, ModelPatch
