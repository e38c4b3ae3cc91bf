"""Networks of toy world v2, built from ComfyUI's own model classes at a small size so that every
path a Flux/SD user runs (VAE encode/decode, a T5 text encoder, the Flux double/single-stream
blocks and their ``patches_replace["dit"]`` hooks) runs on the family's real code:

* VAE: ``comfy.ldm.models.autoencoder.AutoencoderKL`` (the SD VAE), 8 latent channels at 1/4
  resolution (64x64 -> 8x16x16), ~1.3 M parameters;
* text encoder: ``comfy.text_encoders.t5.T5`` (a T5 v1.1 encoder, Flux's text encoder family),
  4 layers of width 128 over the grammar's words, ~1.1 M parameters; its token outputs are the
  DiT's context, their mean its pooled vector;
* main DiT: ``comfy.ldm.flux.model.Flux`` (3 double + 6 single blocks, width 160, patch 2),
  ~5.3 M parameters; weak DiT for Autoguidance: the same class at width 96, 1 + 3 blocks, ~0.85 M;
* pixel classifier and the contrastive image encoder (training only): ``ImageClassifier``, a
  small CNN (own code: nothing in ComfyUI fits).

Parameter budget (fp16 on disk, 2 bytes each): VAE 2.6 MB, text encoder 2.1 MB, main DiT 10.6 MB,
weak DiT 1.7 MB, classifier 1.8 MB: 18.8 MB, leaving 6.2 MB of the 25 MB for the artifacts later
sessions re-make (PPAP experts, DeeDiff heads, calibrations).

Construction uses ComfyUI's ``disable_weight_init`` operations (what ComfyUI itself builds, so
state dicts match key for key) and then ``initialise`` (those operations skip initialisation).
ComfyUI's Flux and T5 blocks add residuals in place, which autograd refuses; ``trainable`` wraps a
forward in ``torch.func.functionalize`` (the same computation, out of place) for training.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import host, scenes

host.ensure_comfy()

import comfy.ops  # noqa: E402
from comfy.ldm.flux.layers import Modulation  # noqa: E402
from comfy.ldm.flux.model import Flux  # noqa: E402
from comfy.ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from comfy.text_encoders.t5 import T5  # noqa: E402

OPERATIONS = comfy.ops.disable_weight_init
LATENT_CHANNELS = 8
LATENT_DOWNSCALE = 4
TEXT_WIDTH = 128

VAE = {"embed_dim": LATENT_CHANNELS,
       "ddconfig": {"double_z": True, "z_channels": LATENT_CHANNELS, "resolution": scenes.IMAGE_SIZE,
                    "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2,
                    "attn_resolutions": [], "dropout": 0.0}}
TEXT_ENCODER = {"vocab_size": len(scenes.VOCAB), "d_model": TEXT_WIDTH, "d_kv": 32, "num_heads": 4, "d_ff": 512,
                "num_layers": 4, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "model_type": "t5"}
_FLUX_COMMON = {"in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "vec_in_dim": TEXT_WIDTH,
                "context_in_dim": TEXT_WIDTH, "mlp_ratio": 4.0, "axes_dim": [4, 14, 14], "theta": 10000,
                "patch_size": 2, "qkv_bias": True, "guidance_embed": False}
MAIN_DIT = {**_FLUX_COMMON, "hidden_size": 160, "num_heads": 5, "depth": 3, "depth_single_blocks": 6}
WEAK_DIT = {**_FLUX_COMMON, "hidden_size": 96, "num_heads": 3, "depth": 1, "depth_single_blocks": 3}
CLASSIFIER = {"heads": {"colour": len(scenes.COLOURS), "shape": len(scenes.SHAPES),
                        "texture": len(scenes.TEXTURES), "size": len(scenes.SIZES),
                        "position": len(scenes.POSITIONS)}, "width": 32}
CLASSIFIER_LABELS = {"colour": scenes.COLOURS, "shape": scenes.SHAPES, "texture": scenes.TEXTURES,
                     "size": scenes.SIZES, "position": scenes.POSITIONS}
IMAGE_ENCODER = {"heads": {"embedding": TEXT_WIDTH}, "width": 16}
TEXT_PROJECTION = {"width": TEXT_WIDTH}


class ImageClassifier(nn.Module):
    """Small CNN over 64x64 images in [-1, 1]: five 3x3 conv stages (the last four stride 2, so a
    4x4 map keeps where things are), a 256-wide feature layer and one linear head per output."""

    def __init__(self, heads, width=32, dtype=None, device=None, operations=None):
        super().__init__()

        def stage(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU()]

        widths = [width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers = stage(3, widths[0], 1)
        for cin, cout in zip(widths, widths[1:]):
            layers += stage(cin, cout, 2)
        grid = scenes.IMAGE_SIZE // 16
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * grid * grid, 256), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, size) for name, size in heads.items()})

    def forward(self, images):
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}


class TextProjection(nn.Module):
    """Contrastive head of the text stage (training only): a linear map of the pooled text and CLIP's
    learnable logit scale (initial temperature 0.07)."""

    def __init__(self, width=TEXT_WIDTH):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pooled):
        return self.linear(pooled)


def initialise(module):
    """Initialise a module built with ComfyUI's ``disable_weight_init`` operations (which leave weights
    uninitialised): PyTorch's default for every linear, convolution, embedding and norm layer, scales
    of RMS norms at one; T5's relative position bias at zero; in Flux, every modulation and the
    final layer at zero, so each block starts as the identity and the output at zero (adaLN-Zero)."""
    for layer in module.modules():
        for base in (nn.Linear, nn.Conv2d, nn.Embedding, nn.GroupNorm, nn.LayerNorm):
            if isinstance(layer, base):
                base.reset_parameters(layer)
                break
        else:
            for name in ("scale", "weight"):  # Flux's RMSNorm, T5's T5LayerNorm
                parameter = getattr(layer, name, None)
                if isinstance(parameter, nn.Parameter) and parameter.ndim == 1 and not list(layer.children()):
                    nn.init.ones_(parameter)
    if isinstance(module, T5):
        for block in module.encoder.block:
            bias = block.layer[0].SelfAttention.relative_attention_bias
            if bias is not None:
                nn.init.zeros_(bias.weight)
    if isinstance(module, Flux):
        zeroed = [m.lin for m in module.modules() if isinstance(m, Modulation)]
        zeroed += [module.final_layer.linear, module.final_layer.adaLN_modulation[-1]]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def build_vae(embed_dim, ddconfig):
    return initialise(AutoencoderKL(embed_dim=embed_dim, ddconfig=ddconfig))


def build_text_encoder(**config):
    return initialise(T5(config, dtype=torch.float32, device=None, operations=OPERATIONS))


def build_dit(**config):
    return initialise(Flux(dtype=torch.float32, operations=OPERATIONS, **config))


def build_image_classifier(**config):
    return ImageClassifier(**config)


def build_text_projection(**config):
    return TextProjection(**config)


ARCHITECTURES = {"vae": build_vae, "text_encoder": build_text_encoder, "dit": build_dit,
                 "image_classifier": build_image_classifier, "text_projection": build_text_projection}
"""Builders by architecture name (weight files record the name and the builder's arguments)."""


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def trainable(function):
    """``function`` (a forward through Flux or T5 blocks) made differentiable: functionalised, so
    ComfyUI's in-place residual additions become out-of-place ones with the same values."""
    return torch.func.functionalize(function)


# ---------------------------------------------------------------- the latent world's forward paths

def tokens(prompts, device=None):
    """LongTensor [B, MAX_TOKENS] of the grammar tokenizer's ids."""
    return torch.tensor([scenes.tokenize(p) for p in prompts], device=device)


def encode_text(text_encoder, token_ids):
    """(context [B, L, 128], pooled [B, 128]): T5 token outputs and their mean (Flux's ``y``)."""
    context, _ = text_encoder(token_ids, attention_mask=None)
    return context, context.mean(dim=1)


def encode_images(vae, images):
    """Latent means [B, 8, 16, 16] of images [B, 3, 64, 64] in [-1, 1] (the posterior's mode)."""
    moments = vae.quant_conv(vae.encoder(images))
    return moments[:, :LATENT_CHANNELS]


def decode_latents(vae, latents):
    """Images [B, 3, 64, 64] (about [-1, 1]) of raw latents."""
    return vae.decoder(vae.post_quant_conv(latents))


def velocity(dit, x, sigma, context, pooled, transformer_options=None):
    """Flux's velocity prediction (noise - x0) at noise level ``sigma`` in [0, 1] (Flux embeds
    timesteps times 1000 itself); ``transformer_options`` as ComfyUI passes them (copied: Flux
    writes block indices into the dict)."""
    return dit(x, sigma, context, y=pooled, transformer_options=dict(transformer_options or {}))


def logit_normal_sigma(batch, generator):
    """Training noise levels: sigmoid of a standard normal (SD3), concentrated at mid noise."""
    return torch.sigmoid(torch.randn(batch, generator=generator))


def flow_matching_loss(dit, x0, context, pooled, generator):
    """Rectified-flow loss: x_t = (1 - sigma) x0 + sigma noise, MSE of the velocity against noise - x0.
    Noise and sigma come from ``generator`` (CPU) and move to x0's device, so runs match across devices."""
    sigma = logit_normal_sigma(x0.shape[0], generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    sigma_ = sigma[:, None, None, None]
    x_t = (1 - sigma_) * x0 + sigma_ * noise
    prediction = trainable(lambda *args: velocity(dit, *args))(x_t, sigma, context, pooled)
    return F.mse_loss(prediction, noise - x0)


def contrastive_logits(image_embedding, text_embedding, logit_scale):
    """Cosine-similarity logits [B_images, B_texts] scaled by exp(logit_scale) (CLIP), scale capped at 100."""
    image_embedding = F.normalize(image_embedding, dim=-1)
    text_embedding = F.normalize(text_embedding, dim=-1)
    return image_embedding @ text_embedding.T * logit_scale.clamp(max=math.log(100.0)).exp()
