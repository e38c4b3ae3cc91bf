"""A technique's GUIDER node and its MODEL-patch twin from one list of inputs (``guider_and_patch``); both run
the same patched clone (the GUIDER is ComfyUI's CFGGuider over it, or what ``TwinSpec.guider`` builds)."""
from dataclasses import dataclass
from typing import Callable

from comfy_api.latest import io

from .checks import check_number, check_numeric_inputs
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
    guider_options: Callable[[], list] = list  # inputs of the GUIDER alone, after ``options``, given to ``guider``
    guider: Callable = cfg_guider  # (patched, positive, negative, cfg, **guider_options) -> the GUIDER
    # True: each node checks every INT/FLOAT input against its widget (``check_numeric_inputs``) and passes
    # ``node=<its display name>`` to ``patch``, so that errors name the node that ran, not the technique
    errors_name_the_node: bool = False


def guider_and_patch(spec: TwinSpec) -> tuple[type[io.ComfyNode], type[io.ComfyNode]]:
    """(GUIDER node, MODEL-patch node) of a technique, from one list of inputs."""
    guider_where = spec.guider_display.removesuffix(" (Guidance Kit)")
    patch_where = spec.patch_display.removesuffix(" (Guidance Kit)")

    def guider_node_inputs():
        return [*spec.guider_inputs(), *spec.options(), *spec.guider_options()]

    def checked(node_cls, where: str, inputs: dict) -> dict:
        """The keyword naming the node for ``patch`` (``errors_name_the_node``, after checking ``inputs``)."""
        if not spec.errors_name_the_node:
            return {}
        check_numeric_inputs(node_cls, where, inputs)
        return {"node": where}

    class Guider(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=spec.guider_id, display_name=spec.guider_display, category=spec.category,
                             description=spec.guider_description, inputs=guider_node_inputs(),
                             outputs=[io.Guider.Output()], hidden=[io.Hidden.unique_id])

        @classmethod
        def execute(cls, *args, **inputs) -> io.NodeOutput:
            inputs |= dict(zip([i.id for i in guider_node_inputs()], args))
            node = checked(cls, guider_where, inputs)
            model, positive, negative, cfg = (inputs.pop(i.id) for i in spec.guider_inputs())
            guider_options = {i.id: inputs.pop(i.id) for i in spec.guider_options()}
            check_number(guider_where, "cfg", cfg, 0.0, 100.0)
            if spec.check_guider is not None:
                spec.check_guider(positive, negative, **inputs)
            patched = spec.patch(model, node_id_of(cls), **node, **inputs)
            return io.NodeOutput(spec.guider(patched, positive, negative, cfg, **guider_options))

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
            return io.NodeOutput(spec.patch(model, node_id_of(cls), **checked(cls, patch_where, options), **options))

    for node, suffix in ((Guider, "Guider"), (ModelPatch, "ModelPatch")):
        node.__name__ = node.__qualname__ = f"{spec.name}{suffix}"
    return Guider, ModelPatch
