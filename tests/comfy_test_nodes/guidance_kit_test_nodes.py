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


class TestNodes(ComfyExtension):
    async def get_node_list(self):
        return [TinyModelLoader, TinyTextEncoder, TinyFlux]


async def comfy_entrypoint():
    return TestNodes()
