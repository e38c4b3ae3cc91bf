"""Tiny random-weight models built through ComfyUI's own model classes, one per family.

Each builder returns a ``TinyModel``: a real ``ModelPatcher`` over a ``comfy.model_base`` model
and a pair of CONDITIONING lists (positive, negative) shaped as that family's text encoder would
produce them.  Weights are initialised deterministically from a seed (ComfyUI's ops skip
initialisation), so every run of a test sees the same model.

``write_model_files`` writes each checkpoint family's smallest files the stock loaders detect (SD1.5, SDXL,
SD3.5, Flux's VAE) under the standard file names, for the real-model workflow runs; ``TinyTextEncoder`` and
``tiny_flux`` stand in for what cannot be made small (see the notes above ``CHECKPOINT_FAMILIES``).
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .comfy_host import boot

FAMILIES = ("sd15_eps", "sdxl_adm", "sd15_v", "sd3_flow")


@dataclass
class TinyModel:
    family: str
    patcher: object
    positive: list
    negative: list
    latent_channels: int
    latent_size: int = 8

    def empty_latent(self, batch: int = 1) -> dict:
        return {"samples": torch.zeros(batch, self.latent_channels, self.latent_size, self.latent_size)}


def _initialise(network: torch.nn.Module, seed: int) -> None:
    """Fill the diffusion network's weights (and buffers such as MMDiT's pos_embed, left empty)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(network.named_parameters()) + list(network.named_buffers()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            if tensor.ndim >= 2:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                tensor.fill_(1.0)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)


def _patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def _unet_config(**overrides) -> dict:
    config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1],
                  channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                  transformer_depth_middle=1, use_spatial_transformer=True, legacy=False, context_dim=64,
                  num_heads=2, num_head_channels=-1, use_linear_in_transformer=False, adm_in_channels=None,
                  use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32)
    config.update(overrides)
    return config


def _conds(context_dim: int, tokens: int, seed: int, **extras) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, tokens, context_dim, generator=generator), dict(extras)]]
    negative = [[torch.randn(1, tokens, context_dim, generator=generator), dict(extras)]]
    return positive, negative


def build(family: str, seed: int = 0) -> TinyModel:
    """Build the tiny model of ``family`` (one of FAMILIES)."""
    boot()
    import comfy.model_base
    import comfy.supported_models
    from comfy.model_base import ModelType

    # Note: each family's unet_extra_config overrides the head settings (SD15: 8 heads; SDXL: 64-dim heads).
    if family in ("sd15_eps", "sd15_v"):
        config = comfy.supported_models.SD15(_unet_config())
        model_type = ModelType.EPS if family == "sd15_eps" else ModelType.V_PREDICTION
        model = comfy.model_base.BaseModel(config, model_type=model_type)
        positive, negative = _conds(64, 8, seed)
        channels = 4
    elif family == "sdxl_adm":
        config = comfy.supported_models.SDXL(_unet_config(adm_in_channels=2816, num_classes="sequential",
                                                          model_channels=64))
        model = comfy.model_base.SDXL(config)
        generator = torch.Generator().manual_seed(seed + 1)
        pooled = {"pooled_output": torch.randn(1, 1280, generator=generator), "width": 64, "height": 64}
        positive, negative = _conds(64, 8, seed, **pooled)
        channels = 4
    elif family == "sd3_flow":
        config = comfy.supported_models.SD3(dict(
            in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, pos_embed_max_size=8,
            num_patches=64, adm_in_channels=32, pos_embed_scaling_factor=None,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
            dtype=torch.float32))
        model = comfy.model_base.SD3(config)
        generator = torch.Generator().manual_seed(seed + 1)
        positive, negative = _conds(64, 8, seed, pooled_output=torch.randn(1, 32, generator=generator))
        channels = 16
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {FAMILIES}")
    _initialise(model.diffusion_model, seed)
    model.eval()
    return TinyModel(family, _patcher(model), positive, negative, channels)


class WordClip:
    """Stand-in CLIP for a tiny model: each text maps to a fixed random embedding (with the model's extras)."""

    def __init__(self, tiny):
        self.embedding, self.extras = tiny.positive[0]

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, text):
        seed = sum(map(ord, text)) + 7 * len(text)
        return [[torch.randn(self.embedding.shape, generator=torch.Generator().manual_seed(seed)), dict(self.extras)]]


# ---------------------------------------------------------------- tiny files under the standard names
#
# The smallest state dicts the stock loaders (CheckpointLoaderSimple, UNETLoader, VAELoader) detect as each
# family, written under the file names the shipped workflows load.  Substitutes, used only in the tests:
# * the VAE is a random-weight TAESD (ComfyUI's VAE class detects it by its ``taesd_decoder.`` keys): the
#   families' full AutoencoderKL (about 83M weights, fixed by ComfyUI) would dominate the test's time;
# * the text encoders cannot be made small (ComfyUI builds CLIP-L/G and T5-XXL at their full size whatever the
#   file holds), so the checkpoints carry none and the test feeds every CLIP input from the test-only node
#   ``GuidanceKitTestTinyTextEncoder`` (``TinyTextEncoder``: the family's context and pooled shapes);
# * Flux is loaded by a test-only node in place of UNETLoader (``tiny_flux``: ComfyUI fixes its width);
# * CLIP vision (GFCG's zero-shot classifier) is a 2-layer ViT from a tiny config (``tiny_clip_vision``), its
#   projection as wide as the family's pooled text output, in place of CLIPVisionLoader's full-size file;
# * SDXL is detected as Segmind Vega (``comfy.supported_models.Segmind_Vega``, a subclass of SDXL with the same
#   model class, conditioning and latent format): SDXL's own detection requires its 24 + 36 transformer blocks.

@dataclass(frozen=True)
class CheckpointFamily:
    """A family's tiny files: {folder under models/: file name} and its text encoder's output shapes."""
    files: dict
    context_dim: int
    pooled_dim: int | None
    latent_channels: int


CHECKPOINT_FAMILIES = {
    "sd15": CheckpointFamily({"checkpoints": "v1-5-pruned-emaonly.safetensors"}, 768, None, 4),
    "sdxl": CheckpointFamily({"checkpoints": "sd_xl_base_1.0.safetensors"}, 2048, 1280, 4),
    "sd35": CheckpointFamily({"checkpoints": ("sd3.5_medium.safetensors", "sd3.5_large.safetensors")}, 64, 32, 16),
    "flux": CheckpointFamily({"vae": "ae.safetensors"}, 64, 32, 16),  # the network: tiny_flux()
}
TEXT_ENCODER_FILES = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")  # empty placeholders


def _diffusion_network(family: str, seed: int) -> torch.nn.Module:
    """The family's smallest diffusion network the stock detection accepts, built from ComfyUI's classes."""
    import comfy.model_base
    import comfy.supported_models

    if family == "sd15":
        config = comfy.supported_models.SD15(_unet_config(
            model_channels=320, context_dim=768, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1],
            transformer_depth_output=[0, 0], transformer_depth_middle=-1))
        network = comfy.model_base.BaseModel(config).diffusion_model
    elif family == "sdxl":
        config = comfy.supported_models.Segmind_Vega(_unet_config(
            model_channels=320, context_dim=2048, channel_mult=[1], num_res_blocks=[6],
            transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0] * 7, transformer_depth_middle=-1,
            use_linear_in_transformer=True, adm_in_channels=2816,
            num_classes="sequential"))
        network = comfy.model_base.SDXL(config).diffusion_model
    elif family == "sd35":
        network = build("sd3_flow", seed).patcher.model.diffusion_model
    else:
        raise ValueError(f"unknown checkpoint family {family!r}; choose one of {sorted(CHECKPOINT_FAMILIES)}")
    _initialise(network, seed)
    return network


def _taesd_state_dict(latent_channels: int, seed: int) -> dict:
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _initialise(vae, seed)
    return vae.state_dict()


def write_model_files(family: str, models: Path, seed: int = 0) -> list[Path]:
    """Write ``family``'s tiny files under ``models/<folder>/<standard name>`` (and empty text encoder files,
    so the workflows' loader widgets validate); returns the paths written."""
    boot()
    import comfy.utils

    spec = CHECKPOINT_FAMILIES[family]
    network = {} if family == "flux" else {key: value.to(torch.float16).contiguous()
                                           for key, value in _diffusion_network(family, seed).state_dict().items()}
    vae = _taesd_state_dict(spec.latent_channels, seed + 1)
    written = []
    for folder, names in spec.files.items():
        for name in (names,) if isinstance(names, str) else names:
            path = Path(models) / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if folder == "checkpoints":
                weights = {**{f"model.diffusion_model.{k}": v for k, v in network.items()},
                           **{f"first_stage_model.{k}": v for k, v in vae.items()}}
            else:
                weights = vae
            comfy.utils.save_torch_file(weights, str(path))
            written.append(path)
    for name in TEXT_ENCODER_FILES:
        path = Path(models) / "text_encoders" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return written


class TinyTextEncoder:
    """Stand-in CLIP of a checkpoint family (``CHECKPOINT_FAMILIES``): each text maps to a fixed random
    context [1, 8, context_dim] (and pooled output), the shapes the family's tiny network reads."""

    def __init__(self, family: str):
        self.spec = CHECKPOINT_FAMILIES[family]

    def tokenize(self, text, **kwargs):
        return text

    def _encode(self, text) -> tuple[torch.Tensor, torch.Tensor | None]:
        generator = torch.Generator().manual_seed(sum(map(ord, text)) + 7 * len(text))
        context = torch.randn(1, 8, self.spec.context_dim, generator=generator)
        pooled = torch.randn(1, self.spec.pooled_dim, generator=generator) if self.spec.pooled_dim else None
        return context, pooled

    def encode_from_tokens_scheduled(self, text, **kwargs):
        context, pooled = self._encode(text)
        return [[context, {} if pooled is None else {"pooled_output": pooled}]]

    def encode_from_tokens(self, text, return_pooled=False, return_dict=False):
        context, pooled = self._encode(text)
        if return_dict:
            return {"cond": context, "pooled_output": pooled}
        return (context, pooled) if return_pooled else context


def tiny_flux(seed: int = 0):
    """A tiny Flux-dev-class MODEL (guidance embedding, 1 double and 1 single block of 128 wide).  The stock
    detection fixes Flux at 24 heads of 128 channels (hidden size 3072, over 300M weights per double block),
    so the tests load this one in place of UNETLoader's flux1-dev.safetensors."""
    import comfy.model_base
    import comfy.supported_models

    boot()
    config = comfy.supported_models.Flux(dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=128,
        mlp_ratio=2.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
        qkv_bias=True, guidance_embed=True))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.Flux(config)
    _initialise(model.diffusion_model, seed)
    model.eval()
    return _patcher(model)


def tiny_clip_vision(projection_dim: int, seed: int = 7):
    """A ComfyUI ``ClipVisionModel`` of two 32-wide layers on 32x32 images, its projection ``projection_dim``
    wide: the CLIP vision stand-in of the tests."""
    import json
    import tempfile

    boot()
    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
              "image_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
              "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8,
              "projection_dim": projection_dim}
    with tempfile.TemporaryDirectory(prefix="guidance-kit-clip-vision-") as directory:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(config))
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
    _initialise(clip_vision.model, seed)
    return clip_vision
