"""Pure-torch networks of the toy world: a token text encoder, a small DiT that predicts the
flow-matching velocity from [text; image] tokens, and a small CNN classifier.

Every class keeps its constructor arguments in ``self.config`` so ``weights.load_checked`` can
rebuild it from a safetensors file's metadata.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class ToyTextEncoder(nn.Module):
    """Token + position embeddings, pre-LN transformer encoder layers, final LayerNorm."""

    def __init__(self, vocab_size, dim=128, layers=2, heads=4, max_tokens=16):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "dim": dim, "layers": layers, "heads": heads, "max_tokens": max_tokens}
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.randn(1, max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        """tokens: LongTensor [B, L <= max_tokens] -> [B, L, dim]."""
        h = self.token_embedding(tokens) + self.position_embedding[:, :tokens.shape[1]]
        return self.norm(self.encoder(h))


def timestep_embedding(timesteps, dim, max_period=10000.0):
    """Sinusoidal embedding [B, dim] of (float) timestep values."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_2d_embedding(grid, dim):
    """Fixed 2D sin-cos position embedding [grid*grid, dim] (row-major, as DiT)."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = [axis.reshape(-1, 1) * freqs for axis in (rows, cols)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))


class DiTBlock(nn.Module):
    """Pre-LN attention + MLP, each modulated (shift, scale, gate) from ``vec`` (adaLN-Zero)."""

    def __init__(self, width, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, h, vec):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(vec).chunk(6, dim=-1)
        h = h + gate1[:, None] * self.attn(modulate(self.norm1(h), shift1, scale1))
        return h + gate2[:, None] * self.mlp(modulate(self.norm2(h), shift2, scale2))


class ToyDiT(nn.Module):
    """DiT with in-context text tokens; predicts the velocity n - x0 at timestep sigma*1000.

    Hidden state ``h`` is [B, L_text + num_patches, width]: text tokens first, image tokens last.
    ``embed`` -> ``blocks`` -> ``head`` is the forward pass; ``head`` applies the final layer to any
    hidden state (early exits share it). Image tokens get fixed 2D sin-cos positions (a learned
    embedding initialised at std 0.02 had not moved after 1000 steps, and samples ignored
    position); text tokens carry positions from the text encoder. The modulation vector ``vec`` is
    MLP(timestep embedding) + Linear(mean of the context tokens), a pooled-text path like SD3's
    and Flux's, so every block sees the prompt without first learning to attend to it.
    """

    def __init__(self, in_channels=3, image_size=32, patch_size=4, width=128, depth=8, heads=4,
                 context_dim=128, num_text_tokens=16):
        super().__init__()
        self.config = {"in_channels": in_channels, "image_size": image_size, "patch_size": patch_size,
                       "width": width, "depth": depth, "heads": heads, "context_dim": context_dim,
                       "num_text_tokens": num_text_tokens}
        self.in_channels, self.patch_size = in_channels, patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid ** 2
        self.num_text_tokens = num_text_tokens
        self.patch_embed = nn.Linear(in_channels * patch_size ** 2, width)
        self.context_embed = nn.Linear(context_dim, width)
        self.register_buffer("image_positions", sincos_2d_embedding(self.grid, width)[None], persistent=False)
        self.time_frequencies = 256
        self.time_embed = nn.Sequential(nn.Linear(self.time_frequencies, width), nn.SiLU(), nn.Linear(width, width))
        self.pooled_text_embed = nn.Linear(context_dim, width)
        self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_linear = nn.Linear(width, in_channels * patch_size ** 2)
        for layer in (self.final_modulation[1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x, timesteps, context):
        """(x [B,C,H,W], timesteps [B] in [0, 1000], context [B,L_text,context_dim]) -> (h, vec)."""
        text_tokens = context.shape[1]
        if text_tokens > self.num_text_tokens:
            raise ValueError(f"context has {text_tokens} tokens, ToyDiT takes at most {self.num_text_tokens}")
        patches = rearrange(x, "b c (gh p) (gw q) -> b (gh gw) (c p q)", p=self.patch_size, q=self.patch_size)
        image = self.patch_embed(patches) + self.image_positions.to(patches.dtype)
        h = torch.cat([self.context_embed(context), image], dim=1)
        vec = self.time_embed(timestep_embedding(timesteps, self.time_frequencies).to(h.dtype))
        return h, vec + self.pooled_text_embed(context.mean(dim=1))

    def head(self, h, vec):
        """Final adaLN + linear on the image tokens of any hidden state -> [B, C, H, W]."""
        shift, scale = self.final_modulation(vec).chunk(2, dim=-1)
        out = self.final_linear(modulate(self.final_norm(h[:, -self.num_patches:]), shift, scale))
        return rearrange(out, "b (gh gw) (c p q) -> b c (gh p) (gw q)",
                         gh=self.grid, p=self.patch_size, q=self.patch_size)

    def forward(self, x, timesteps, context, transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI signature)
        """Velocity prediction; blocks can be replaced ComfyUI-style via
        ``transformer_options["patches_replace"]["dit"][("single_block", i)]``.
        The caller's dict is not mutated: ``block_index`` is set on a shallow copy."""
        transformer_options = dict(transformer_options)
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        h, vec = self.embed(x, timesteps, context)
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            if ("single_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], args["vec"])}
                out = blocks_replace[("single_block", i)](
                    {"img": h, "vec": vec, "pe": None, "transformer_options": transformer_options},
                    {"original_block": block_wrap})
                h = out["img"]
            else:
                h = block(h, vec)
        return self.head(h, vec)


class ToyClassifier(nn.Module):
    """Small CNN over single-object images in [-1, 1]: logits for colour, shape and position."""

    def __init__(self, num_colours, num_shapes, num_positions, width=32):
        super().__init__()
        self.config = {"num_colours": num_colours, "num_shapes": num_shapes, "num_positions": num_positions,
                       "width": width}

        def conv(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU()]

        self.features = nn.Sequential(*conv(3, width, 1), *conv(width, 2 * width, 2), *conv(2 * width, 4 * width, 2),
                                      *conv(4 * width, 4 * width, 2), nn.Flatten(),
                                      nn.Linear(4 * width * 4 * 4, 256), nn.GELU())
        self.heads = nn.ModuleDict({"colour": nn.Linear(256, num_colours), "shape": nn.Linear(256, num_shapes),
                                    "position": nn.Linear(256, num_positions)})

    def forward(self, x):
        features = self.features(x)
        return {name: head(features) for name, head in self.heads.items()}
