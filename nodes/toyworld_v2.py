"""Toy world v2 in ComfyUI (docs/toyworld.md): a latent world on a real family's code.

* MODEL: ``ModelPatcher`` over ``comfy.model_base.Flux`` (model type FLUX, ``ModelSamplingFlux`` with
  shift 0, so sigma = t as in training) whose network is ComfyUI's own Flux class at a small size: block
  replacements (``patches_replace["dit"]`` "double_block"/"single_block"), DIFFUSION_MODEL wrappers and
  every Flux code path of the pack run on it unchanged.
* CLIP: ``comfy.sd.CLIP`` over the world's T5 encoder; the grammar's words are its vocabulary, prompt
  weights ``(word:1.2)`` work as in ComfyUI's own text encoders (``ClipTokenWeightEncoder``), the pooled
  output is the mean of the token outputs (Flux's ``y``).
* VAE: ``comfy.sd.VAE`` over the world's ``AutoencoderKL`` (8 channels at 1/4 resolution), so VAE Encode,
  VAE Decode, tiled decoding and latent previews (the latent RGB factors fitted in training) work.

Weights: ``toyworld/v2/weights/`` next to the pack, extra diffusion models in ComfyUI's
``models/toyworld_v2/``.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
from comfy_api.latest import io

from ..toyworld.v2 import model as world_model
from ..toyworld.v2 import scenes
from ..toyworld.v2 import weights as world_weights
from .contract import model_files
from .contract.toy_worlds import FrozenTextEncoderModel, empty_latent_node

CATEGORY = "Guidance Kit/toy world"
FOLDER = "toyworld_v2"
NODE = "Load Toy World v2"
TOKEN_KEY = "t5"


class ToyWorldV2LatentFormat(comfy.latent_formats.SD3):
    """8 channels at 1/4 resolution, normalised as SD3/Flux latents ((latent - shift) * scale); scale, shift
    and the RGB preview factors come from the VAE's training."""

    latent_channels = world_model.LATENT_CHANNELS
    taesd_decoder_name = None

    def use_statistics(self, vae_metadata: dict):
        """Take ``latent_scale``, ``latent_shift`` and the RGB factors from a v2 VAE file's metadata."""
        self.scale_factor = float(vae_metadata["latent_scale"])
        self.shift_factor = float(vae_metadata["latent_shift"])
        self.latent_rgb_factors = json.loads(vae_metadata["latent_rgb_factors"])
        self.latent_rgb_factors_bias = json.loads(vae_metadata["latent_rgb_factors_bias"])


class ToyWorldV2Config(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    latent_format = ToyWorldV2LatentFormat
    sampling_settings = {"shift": 0.0}  # ModelSamplingFlux: sigma = exp(0) / (exp(0) + 1/t - 1) = t
    memory_usage_factor = 0.05
    supported_inference_dtypes = [torch.float32]


def _checked(path, prefix, what):
    """(module, metadata) of a v2 weight file; ValueError naming the node, the file and ``what`` it should be."""
    if not path.exists():
        raise ValueError(f"{NODE}: {path} does not exist: toy world v2 is not trained yet "
                         "(run `make train-toyworld-v2`, docs/toyworld.md)")
    try:
        module, metadata = world_weights.load_checked(path, prefix)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, json.JSONDecodeError) as error:
        raise ValueError(f"{NODE}: {path} is not a toy world v2 {what} ({error})") from None
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        raise ValueError(f"{NODE}: {path} holds NaN or inf weights")
    return module, metadata


def load_model(path, vae_metadata: dict) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over the v2 Flux DiT in ``path``, its latent format taken from ``vae_metadata``."""
    network, metadata = _checked(path, world_weights.PREFIXES["dit"], "diffusion model")
    if metadata.get("architecture") != "dit":
        raise ValueError(f"{NODE}: {path} holds a {metadata.get('architecture')}, not a diffusion model")
    config = ToyWorldV2Config({**json.loads(metadata["config"]), "disable_unet_model_creation": True})
    config.latent_format.use_statistics(vae_metadata)
    model = comfy.model_base.Flux(config)
    model.diffusion_model = network
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class ToyWorldV2Tokenizer:
    """ComfyUI's tokenizer protocol over the grammar's words: one section of ``MAX_TOKENS`` (words, then
    EOS, then PAD; longer prompts are cut), prompt weights parsed as ComfyUI's own tokenizers do."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's signature)
        pass

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        tokens = []
        for segment, weight in comfy.sd1_clip.token_weights(comfy.sd1_clip.escape_important(text), 1.0):
            words = scenes.words(comfy.sd1_clip.unescape_important(segment))
            tokens += [(scenes.word_id(word), weight) for word in words]
        tokens = tokens[:scenes.MAX_TOKENS - 1]
        if return_word_ids:
            tokens = [(token, weight, index + 1) for index, (token, weight) in enumerate(tokens)]
        padding = (0,) if return_word_ids else ()
        tokens.append((scenes.TOKEN_ID[scenes.EOS], 1.0, *padding))
        tokens += [(scenes.TOKEN_ID[scenes.PAD], 1.0, *padding)] * (scenes.MAX_TOKENS - len(tokens))
        return {TOKEN_KEY: [tokens]}

    def untokenize(self, token_weight_pair):
        return [(pair, scenes.VOCAB[pair[0]]) for pair in token_weight_pair]

    def state_dict(self):
        return {}


class ToyWorldV2TextEncoder(FrozenTextEncoderModel, comfy.sd1_clip.ClipTokenWeightEncoder):
    """The ``cond_stage_model`` of the v2 CLIP: token ids -> [B, 20, 128] T5 outputs and their mean."""

    special_tokens = {"end": scenes.TOKEN_ID[scenes.EOS], "pad": scenes.TOKEN_ID[scenes.PAD]}

    def encode(self, token_lists):
        ids = torch.tensor(token_lists, device=next(self.text_encoder.parameters()).device)
        with torch.no_grad():
            context, pooled = world_model.encode_text(self.text_encoder, ids)
        return context.float(), pooled.float()

    def encode_token_weights(self, token_weight_pairs):
        return comfy.sd1_clip.ClipTokenWeightEncoder.encode_token_weights(self, token_weight_pairs[TOKEN_KEY])

    def load_sd(self, sd):
        return self.text_encoder.load_state_dict(sd, strict=True)


def load_clip(path) -> comfy.sd.CLIP:
    text_encoder, _ = _checked(path, world_weights.PREFIXES["text_encoder"], "text encoder")
    target = comfy.supported_models_base.ClipTarget(ToyWorldV2Tokenizer, ToyWorldV2TextEncoder)
    target.params = {"text_encoder": text_encoder}
    return comfy.sd.CLIP(target=target, parameters=world_model.parameter_count(text_encoder))


def load_vae(path) -> tuple[comfy.sd.VAE, dict]:
    """(VAE, the file's metadata): ComfyUI's VAE over the world's AutoencoderKL at 1/4 resolution."""
    autoencoder, metadata = _checked(path, world_weights.PREFIXES["vae"], "VAE")
    missing = [key for key in ("latent_scale", "latent_shift", "latent_rgb_factors", "latent_rgb_factors_bias")
               if key not in metadata]
    if missing:
        raise ValueError(f"{NODE}: {path} lacks the latent statistics {missing} (a VAE stage export writes them)")
    vae = comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": json.loads(metadata["config"])})
    vae.downscale_ratio = vae.upscale_ratio = world_model.LATENT_DOWNSCALE
    vae.latent_channels = world_model.LATENT_CHANNELS
    return vae, metadata


def weight_directory():
    return world_weights.WEIGHTS_DIR


def diffusion_model_choices() -> list[str]:
    return model_files.choices(FOLDER)


class ToyWorldV2Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitToyWorldV2Loader",
            display_name="Load Toy World v2 (Guidance Kit)",
            category=CATEGORY,
            description="Toy world v2: a small latent text-to-image world (64x64 scenes, an 8-channel VAE at 1/4 "
                        "resolution, a T5 text encoder and a Flux-structured DiT built from ComfyUI's own classes). "
                        "Runs on CPU; stock text encoding, samplers, VAE and block patches work on it.",
            inputs=[
                io.Combo.Input("diffusion_model", options=diffusion_model_choices(), default=model_files.TOY_V2_DIT,
                               tooltip="The main DiT, or the weak one for Autoguidance. Extra files go in "
                                       "models/toyworld_v2/."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, diffusion_model) -> io.NodeOutput:
        path = model_files.resolve(FOLDER, diffusion_model, NODE, "diffusion_model")
        directory = weight_directory()
        vae, vae_metadata = load_vae(directory / world_weights.FILES["vae"])
        clip = load_clip(directory / world_weights.FILES["text_encoder"])
        return io.NodeOutput(load_model(Path(path), vae_metadata), clip, vae)


LATENT_SIZE = scenes.IMAGE_SIZE // world_model.LATENT_DOWNSCALE
ToyWorldV2EmptyLatent = empty_latent_node(
    "ToyWorldV2EmptyLatent", "GuidanceKitToyWorldV2EmptyLatent", "Empty Toy World v2 Latent (Guidance Kit)",
    CATEGORY, "Number of 64x64 images to generate (latents of 8x16x16).",
    (world_model.LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE))


NODES = [ToyWorldV2Loader, ToyWorldV2EmptyLatent]
