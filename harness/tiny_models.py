"""Tiny random-weight models built through ComfyUI's own model classes, one per family.

Each builder returns a ``TinyModel``: a real ``ModelPatcher`` over a ``comfy.model_base`` model
and a pair of CONDITIONING lists (positive, negative) shaped as that family's text encoder would
produce them.  Weights are initialised deterministically from a seed (ComfyUI's ops skip
initialisation), so every run of a test sees the same model.
"""
import math
from dataclasses import dataclass

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
