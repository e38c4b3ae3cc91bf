"""Example: the toy world's model sampled through Guidance Kit's diffusers guiders.

    python scripts/toy_diffusers_guiders.py [--prompts 8] [--steps 20]

The toy DiT (pixel space, rectified flow, its own text encoder) has no Modular pipeline, so this script
drives the guiders with the loop a Modular denoise block runs (``denoise``: ``observe_sample`` as
``show_latents``' loop block does, ``set_state``, ``prepare_inputs``, ``prepare_models`` / a model call /
``cleanup_models`` per condition, then the guider's combine), with the toy world's Euler steps, one prompt
per call.  Per guider it prints the model calls per
step and image (main and weak model) and the oracle's pass rate on the first dev prompts: an example run,
not a benchmark (bench/ holds those).
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness.comfy_host import comfyui_dir  # noqa: E402

sys.path.insert(0, str(comfyui_dir() / "custom_nodes"))  # the pack as ``guidance_kit``, without booting ComfyUI


@torch.no_grad()
def denoise(guider, dit, cond: torch.Tensor, uncond: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Final samples [B, 3, 32, 32] of Euler steps on sigmas linspace(1, 0), the velocity from ``guider`` (shown each
    step's latent and sigma first, as ``show_latents``' loop block does, when it takes them)."""
    from guidance_kit.diffusers_guiders import StepSample

    size = dit.config["image_size"]
    x = torch.randn(len(cond), dit.config["in_channels"], size, size, generator=torch.Generator().manual_seed(seed))
    for i, (sigma, sigma_next) in enumerate(itertools.pairwise(torch.linspace(1.0, 0.0, steps + 1))):
        timesteps = torch.full((len(cond),), float(sigma) * 1000)
        if hasattr(guider, "observe_sample"):
            guider.observe_sample(StepSample(x, float(sigma), "flow"))
        guider.set_state(step=i, num_inference_steps=steps, timestep=timesteps[0])
        batches = guider.prepare_inputs({"prompt_embeds": (cond, uncond)})
        for batch in batches:
            guider.prepare_models(dit)
            batch.noise_pred = dit(x, timesteps, batch.prompt_embeds)
            guider.cleanup_models(dit)
        x = x + (sigma_next - sigma) * guider(batches).pred
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="the first N dev prompts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from diffusers.guiders import ClassifierFreeGuidance

    from guidance_kit.diffusers_guiders import AdaptiveGuidance, Autoguidance, ComposableGuidance
    from guidance_kit.toyworld import oracle, scenes, weights

    dit, text_encoder = weights.load_main()
    weak = weights.load_weak()
    prompt_set = scenes.dev_prompts()[:args.prompts]
    cond = text_encoder(torch.tensor([scenes.tokenize(prompt) for prompt, _ in prompt_set]))
    uncond = text_encoder(torch.tensor([scenes.tokenize("")] * len(prompt_set)))
    guiders = {
        "cfg": ClassifierFreeGuidance(guidance_scale=args.cfg),
        "adaptive_guidance": AdaptiveGuidance(guidance_scale=args.cfg, threshold=0.99),
        "composable_single": ComposableGuidance(weights=[args.cfg]),
        "autoguidance": Autoguidance(weak_model=weak, guidance_scale=2.0),
    }
    calls = {"model": 0}
    for model in (dit, weak):
        model.patch_embed.register_forward_pre_hook(lambda module, inputs: calls.update(model=calls["model"] + 1))
    for name, guider in guiders.items():
        calls["model"] = 0
        # One prompt per call: AG skips the unconditional pass once every sample of the batch has switched.
        samples = torch.cat([denoise(guider, dit, cond[i:i + 1], uncond[i:i + 1], args.steps, seed=i)
                             for i in range(len(prompt_set))])
        images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        passed = [oracle.judge(image, spec)["pass"] for image, (_, spec) in zip(images, prompt_set)]
        print(json.dumps({"guider": name, "model_calls_per_step": calls["model"] / args.steps / len(prompt_set),
                          "oracle_pass_rate": float(np.mean(passed)), "prompts": len(prompt_set)}))


if __name__ == "__main__":
    main()
