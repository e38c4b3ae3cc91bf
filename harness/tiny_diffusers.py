"""A tiny Modular Stable Diffusion XL pipeline from random components (no download, no text encoder),
for the diffusers guiders' tests and benchmark: prompt embeddings are passed in."""
from dataclasses import dataclass

import torch

HEIGHT = WIDTH = 32      # pixels; latents are 4 x 16 x 16 (the tiny VAE downsamples by 2)
TEXT_TOKENS, TEXT_WIDTH, POOLED_WIDTH = 7, 64, 32


def tiny_unet(seed: int, width: int = 32):
    """An SDXL-shaped UNet (text-time added conditioning, cross-attention) of ~0.3 M parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(width, 2 * width), layers_per_block=1, sample_size=HEIGHT // 2, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=POOLED_WIDTH + 6 * 8, cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8).eval()


def tiny_sdxl_pipeline(seed: int = 0, guider=None, latents_to_guider: bool = False):
    """StableDiffusionXLAutoBlocks without its text-encoder step, with a tiny UNet, VAE and Euler scheduler
    (``latents_to_guider``: with ``show_latents``' loop block, which hands the guider each step's latents)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.stable_diffusion_xl import StableDiffusionXLAutoBlocks

    blocks = StableDiffusionXLAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")
    if latents_to_guider:
        from guidance_kit.diffusers_guiders import show_latents

        show_latents(blocks)
    pipe = blocks.init_pipeline()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8, sample_size=HEIGHT).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    pipe.update_components(unet=tiny_unet(seed), vae=vae, scheduler=scheduler,
                           guider=guider or ClassifierFreeGuidance(guidance_scale=5.0))
    quiet(pipe._blocks)  # the public `blocks` is a copy
    return pipe


def quiet(block) -> None:
    """No progress bars from ``block`` and its nested sub-blocks (the pipeline's own setter stops at the top level)."""
    if hasattr(block, "set_progress_bar_config"):
        block.set_progress_bar_config(disable=True)
    for sub_block in getattr(block, "sub_blocks", {}).values():
        quiet(sub_block)


def prompt_inputs(seed: int, batch: int = 1, negative_seed: int = -1) -> dict:
    """Random prompt embeddings (from ``seed``) and negative embeddings (from ``negative_seed``: one negative
    for every prompt by default, as a fixed negative prompt) as the SDXL pipeline takes them."""
    generator = torch.Generator().manual_seed(seed)
    negative = torch.Generator().manual_seed(2**31 + negative_seed)
    return {"prompt_embeds": torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, generator=generator),
            "negative_prompt_embeds": torch.randn(batch, TEXT_TOKENS, TEXT_WIDTH, generator=negative),
            "pooled_prompt_embeds": torch.randn(batch, POOLED_WIDTH, generator=generator),
            "negative_pooled_prompt_embeds": torch.randn(batch, POOLED_WIDTH, generator=negative)}


def concept_inputs(seed: int) -> dict:
    """One more concept's conditional inputs, named as the SDXL denoise block names them."""
    generator = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_WIDTH, generator=generator),
            "text_embeds": torch.randn(1, POOLED_WIDTH, generator=generator)}


def calls_from_switch_log(log: list, steps: int, batch: int = 1) -> int:
    """UNet calls that Adaptive Guidance's ``switch_log`` implies for one run (CFG over all steps otherwise): two
    per step up to and including the step at which the last sample of the batch switched, one per step after."""
    switched = {sample: entry["step"] for entry in log for sample in entry["samples"]}
    if len(switched) < batch:
        return 2 * steps
    last = max(switched.values())
    return 2 * (last + 1) + (steps - last - 1)


@dataclass
class CallCounter:
    """Counts real evaluations of a UNet: calls of its first convolution (a pass that a hook redirects to
    another model does not reach it)."""

    calls: int = 0

    def attach(self, unet) -> "CallCounter":
        unet.conv_in.register_forward_pre_hook(lambda module, args: setattr(self, "calls", self.calls + 1))
        return self


def generate(pipe, inputs: dict, steps: int, seed: int = 0) -> torch.Tensor:
    """Final latents of one pipeline call."""
    return pipe(**inputs, num_inference_steps=steps, height=HEIGHT, width=WIDTH,
                generator=torch.Generator().manual_seed(seed), output="latents")


class TinyExpertNetwork(torch.nn.Module):
    """A random classifier over the tiny pipeline's latents: 3 colour classes from a convolution's channel means."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, images: torch.Tensor) -> dict:
        return {"colour": self.conv(images).mean((2, 3))}


def tiny_experts(ranges=((0.0, 1.0), (1.0, 20.0)), seed: int = 11):
    """PPAP experts (``samplers.ppap.ExpertClassifier``) for the PPAP guider: one random parameter set of
    ``TinyExpertNetwork`` per σ range (the tiny scheduler's σ at 4 steps: 4.1, 1.6, 0.7, 0.04)."""
    from guidance_kit.samplers import ppap

    generator = torch.Generator().manual_seed(seed)
    experts = [{"conv.weight": torch.randn(3, 4, 3, 3, generator=generator), "conv.bias": torch.zeros(3)}
               for _ in ranges]
    return ppap.ExpertClassifier(TinyExpertNetwork(), experts, torch.tensor(ranges), {"colour": ("r", "g", "b")})
