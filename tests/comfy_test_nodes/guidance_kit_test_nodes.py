"""Test-only ComfyUI nodes, installed only into the test server (never shipped with the pack)."""
import sys
from pathlib import Path

from comfy_api.latest import ComfyExtension, io

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from harness import tiny_models  # noqa: E402


class TinyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitTestTinyModel",
            display_name="Tiny random-weight model (Guidance Kit tests)",
            category="_for_testing",
            inputs=[io.Combo.Input("family", options=list(tiny_models.FAMILIES), tooltip="Model family."),
                    io.Int.Input("batch_size", default=1, min=1, max=8, tooltip="Latent batch size.")],
            outputs=[io.Model.Output(), io.Conditioning.Output(display_name="positive"),
                     io.Conditioning.Output(display_name="negative"), io.Latent.Output()],
        )

    @classmethod
    def execute(cls, family, batch_size) -> io.NodeOutput:
        tiny = tiny_models.build(family)
        return io.NodeOutput(tiny.patcher, tiny.positive, tiny.negative, tiny.empty_latent(batch_size))


class TinyTextEncoder(io.ComfyNode):
    """The text encoder substitute of the real-model workflow runs (harness/tiny_models.py says why)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitTestTinyTextEncoder",
            display_name="Tiny text encoder (Guidance Kit tests)",
            category="_for_testing",
            inputs=[io.Combo.Input("family", options=list(tiny_models.CHECKPOINT_FAMILIES), tooltip="Model family.")],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, family) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.TinyTextEncoder(family))


class TinyFlux(io.ComfyNode):
    """Stands in for UNETLoader's flux1-dev.safetensors in the real-model workflow runs."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitTestTinyFlux",
            display_name="Tiny Flux model (Guidance Kit tests)",
            category="_for_testing",
            inputs=[],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.tiny_flux())


class TinyClipVision(io.ComfyNode):
    """Stands in for CLIPVisionLoader in the real-model workflow runs: projection as wide as the family's pooled
    text output (``tiny_models.tiny_clip_vision``)."""

    @classmethod
    def define_schema(cls):
        families = [name for name, spec in tiny_models.CHECKPOINT_FAMILIES.items() if spec.pooled_dim]
        return io.Schema(
            node_id="GuidanceKitTestTinyClipVision",
            display_name="Tiny CLIP vision (Guidance Kit tests)",
            category="_for_testing",
            inputs=[io.Combo.Input("family", options=families, tooltip="Model family (its pooled text width).")],
            outputs=[io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, family) -> io.NodeOutput:
        return io.NodeOutput(tiny_models.tiny_clip_vision(tiny_models.CHECKPOINT_FAMILIES[family].pooled_dim))


class TestNodes(ComfyExtension):
    async def get_node_list(self):
        return [TinyModelLoader, TinyTextEncoder, TinyFlux, TinyClipVision]


async def comfy_entrypoint():
    return TestNodes()
