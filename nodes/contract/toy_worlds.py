"""What the toy worlds' loader modules (nodes/toyworld.py, nodes/toyworld_v2.py) share: the Empty Latent node
of a world's latent shape and the base of their CLIP text-encoder models."""
import torch

import comfy.model_management
from comfy_api.latest import io

from .checks import check_number


class FrozenTextEncoderModel(torch.nn.Module):
    """Base of the toy worlds' CLIP ``cond_stage_model``: a float32 text encoder that ComfyUI's CLIP options
    (layer skip and the like) leave as it is."""

    def __init__(self, text_encoder: torch.nn.Module, dtype=None, device=None, model_options={}):
        super().__init__()
        self.text_encoder = text_encoder
        self.dtypes = {torch.float32}

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass


def empty_latent_node(name: str, node_id: str, display_name: str, category: str, tooltip: str,
                      latent_shape: tuple[int, int, int]) -> type[io.ComfyNode]:
    """A toy world's Empty Latent node: ``batch_size`` zero latents of ``latent_shape`` (channels, height, width).

    Args:
        name: the node class's name.
        node_id: the schema's node id (workflows refer to it).
        display_name: the schema's display name; errors name it without the " (Guidance Kit)" suffix.
        category: the schema's category.
        tooltip: the ``batch_size`` input's tooltip.
        latent_shape: one latent's (channels, height, width).
    """
    where = display_name.removesuffix(" (Guidance Kit)")

    class EmptyLatent(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=node_id,
                display_name=display_name,
                category=category,
                inputs=[io.Int.Input("batch_size", default=4, min=1, max=256, tooltip=tooltip)],
                outputs=[io.Latent.Output()],
            )

        @classmethod
        def execute(cls, batch_size) -> io.NodeOutput:
            check_number(where, "batch_size", batch_size, 1, 256)
            return io.NodeOutput({"samples": torch.zeros(batch_size, *latent_shape,
                                                         device=comfy.model_management.intermediate_device())})

    EmptyLatent.__name__ = EmptyLatent.__qualname__ = name
    return EmptyLatent
