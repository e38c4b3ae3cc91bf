"""The toy world in ComfyUI: its DiT as a real MODEL, its text encoder as a CLIP, a pixel-space VAE.

The objects are ComfyUI's own classes, so stock nodes (CLIPTextEncode, KSampler, CFGGuider,
SamplerCustomAdvanced, VAEDecode, other packs' model patches) treat the toy model like any
flow-matching DiT:

* MODEL: ``ModelPatcher`` over ``ToyWorldModel`` (a ``comfy.model_base.BaseModel``, model type
  FLOW, ``ModelSamplingDiscreteFlow`` with shift 1 and multiplier 1000, a 3-channel pixel-space
  latent format).  Its network honours ``transformer_options["patches_replace"]["dit"]
  [("single_block", i)]`` like Flux's single blocks, and DIFFUSION_MODEL wrappers.
* CLIP: ``comfy.sd.CLIP`` over the jointly trained toy text encoder; the grammar's words are
  its vocabulary (unknown words map to UNK; prompt weights like ``(word:1.2)`` are not used).
* VAE: ComfyUI's pixel-space VAE (``pixel_space_vae`` key): latents are images scaled to [-1, 1].

Weights come from ``toyworld/weights/`` next to the pack, or from ComfyUI's ``models/toyworld/``.
"""
import torch
from safetensors import SafetensorError

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.supported_models_base
from comfy_api.latest import io

from ..toyworld import scenes, weights
from ..toyworld.model import ToyDiT, ToyTextEncoder
from .contract import model_files
from .contract.toy_worlds import FrozenTextEncoderModel, empty_latent_node

CATEGORY = "Guidance Kit/toy world"
FOLDER = "toyworld"


class ToyWorldLatentFormat(comfy.latent_formats.LatentFormat):
    """Pixel space: 3 channels, images in [-1, 1], previews show the latent itself."""

    latent_channels = 3
    latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


class ToyDiTNetwork(ToyDiT):
    """ToyDiT with ComfyUI's construction signature and DIFFUSION_MODEL wrapper support."""

    def __init__(self, dtype=None, device=None, operations=None, **config):
        super().__init__(**config)
        self.dtype = dtype or torch.float32

    def forward(self, x, timesteps, context, transformer_options={}, **kwargs):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            super().forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timesteps, context, transformer_options, **kwargs)


class ToyWorldConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = ToyWorldLatentFormat
    sampling_settings = {"shift": 1.0, "multiplier": 1000}
    memory_usage_factor = 0.05
    supported_inference_dtypes = [torch.float32]

    def get_model(self, state_dict, prefix="", device=None):
        return ToyWorldModel(self, device=device)


class ToyWorldModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=ToyDiTNetwork)


def weight_files() -> list[str]:
    return model_files.choices(FOLDER)


def load_model(path) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over the toy DiT stored in ``path`` (keys and shapes checked)."""
    network = weights.load_checked(ToyDiTNetwork, path, "diffusion_model")
    model = ToyWorldModel(ToyWorldConfig({"disable_unet_model_creation": True}))
    model.diffusion_model = network
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class ToyTokenizer:
    """ComfyUI tokenizer protocol over the toy grammar's vocabulary (fixed 16 tokens, PAD-filled)."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        pass

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {"toy": [[(token, 1.0) for token in scenes.tokenize(text)]]}

    def untokenize(self, token_weight_pair):
        return [(pair, scenes.VOCAB[pair[0]]) for pair in token_weight_pair]

    def state_dict(self):
        return {}


class ToyTextEncoderModel(FrozenTextEncoderModel):
    """The ``cond_stage_model`` of the toy CLIP: token ids -> [1, 16, 128] context + mean-pooled vector."""

    def encode_token_weights(self, token_weight_pairs):
        ids = torch.tensor([[token for token, _ in pairs] for pairs in token_weight_pairs["toy"]])
        device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            cond = self.text_encoder(ids.to(device)).float()
        return cond, cond.mean(dim=1)

    def load_sd(self, sd):
        return self.text_encoder.load_state_dict(sd, strict=True)


def load_clip(path) -> comfy.sd.CLIP:
    text_encoder = weights.load_checked(ToyTextEncoder, path, "text_encoder")
    target = comfy.supported_models_base.ClipTarget(ToyTokenizer, ToyTextEncoderModel)
    target.params = {"text_encoder": text_encoder}
    return comfy.sd.CLIP(target=target, parameters=sum(p.numel() for p in text_encoder.parameters()))


def pixel_space_vae() -> comfy.sd.VAE:
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


class ToyWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitToyWorldLoader",
            display_name="Load Toy World Model (Guidance Kit)",
            category=CATEGORY,
            description="The pack's embedded toy world: a small text-to-image DiT (flow matching, 32x32 "
                        "pixel space) with its text encoder and a pixel-space VAE. Runs anywhere on CPU.",
            inputs=[
                io.Combo.Input("diffusion_model", options=weight_files(), default="toy_dit.safetensors",
                               tooltip="toy_dit: the main model; toy_dit_weak: the smaller, shorter-trained "
                                       "model for Autoguidance. Extra files go in models/toyworld/."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, diffusion_model) -> io.NodeOutput:
        where = "Load Toy World Model: 'diffusion_model'"
        path = model_files.resolve(FOLDER, diffusion_model, "Load Toy World Model", "diffusion_model")
        try:
            model = load_model(path)
        except (OSError, ValueError, RuntimeError, SafetensorError, TypeError) as error:
            raise ValueError(f"{where}: {path} is not a toy-world DiT file ({error})") from None
        if not all(bool(torch.isfinite(p).all()) for p in model.model.diffusion_model.parameters()):
            raise ValueError(f"{where}: {path} holds NaN or inf weights")
        return io.NodeOutput(model, load_clip(weights.MAIN_WEIGHTS), pixel_space_vae())


ToyWorldEmptyLatent = empty_latent_node(
    "ToyWorldEmptyLatent", "GuidanceKitToyWorldEmptyLatent", "Empty Toy World Latent (Guidance Kit)",
    CATEGORY, "Number of 32x32 images to generate.",
    (ToyWorldLatentFormat.latent_channels, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE))


NODES = [ToyWorldLoader, ToyWorldEmptyLatent]
