"""Pure-torch Euler sampler with classifier-free guidance over a ToyDiT, scored by the oracle.

    python -m toyworld.sample --cfg 1 4 --set dev [--samples 4] [--checkpoint .toyworld-train/main.ckpt.safetensors]

prints one JSON line per cfg scale with oracle pass and fact rates per scene kind. Sampling
matches the training parametrisation: x starts as N(0, I) at sigma 1, 20 Euler steps on
sigmas linspace(1, 0), timesteps sigma*1000, guided velocity v_u + cfg*(v_c - v_u).
"""

import os

# OpenMP threads that spin while waiting collapse throughput on shared cores (10x measured);
# this must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import json
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from . import oracle, scenes, weights
from .model import ToyDiT, ToyTextEncoder


@torch.no_grad()
def euler_sample(dit, text_encoder, prompts, cfg=4.0, steps=20, seed=0):
    """uint8 [B, 32, 32, 3] images for ``prompts``; the empty prompt is the unconditional."""
    cond = text_encoder(torch.tensor([scenes.tokenize(p) for p in prompts]))
    uncond = text_encoder(torch.tensor([scenes.tokenize("")] * len(prompts)))
    size = dit.config["image_size"]
    x = torch.randn(len(prompts), dit.config["in_channels"], size, size, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for sigma, sigma_next in itertools.pairwise(sigmas):
        timesteps = torch.full((len(prompts),), float(sigma) * 1000)
        if cfg == 1.0:
            velocity = dit(x, timesteps, cond)
        else:
            both = dit(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([cond, uncond]))
            v_cond, v_uncond = both.chunk(2)
            velocity = v_uncond + cfg * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * velocity
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def oracle_rates(images, specs, judge=oracle.judge):
    """{kind: {fact: rate}} over images judged by ``judge`` (a world's oracle), 'n' = images of that kind."""
    by_kind = defaultdict(list)
    for image, spec in zip(images, specs):
        by_kind[spec["kind"]].append(judge(image, spec))
    return {kind: {"n": len(verdicts), **{fact: float(np.mean([v[fact] for v in verdicts])) for fact in verdicts[0]}}
            for kind, verdicts in by_kind.items()}


def save_grid(images, path, columns=16, scale=4):
    padding = [np.zeros_like(images[0])]
    rows = [np.concatenate(list(images[i:i + columns]) + padding * (columns - len(images[i:i + columns])), axis=1)
            for i in range(0, len(images), columns)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def load_models(checkpoint=None):
    """(ToyDiT, ToyTextEncoder): the saved main weights, or the EMA inside a training checkpoint."""
    if checkpoint is None:
        return weights.load_main()
    return (weights.load_checked(ToyDiT, checkpoint, "ema.diffusion_model", config_key="diffusion_model"),
            weights.load_checked(ToyTextEncoder, checkpoint, "ema.text_encoder", config_key="text_encoder"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", type=float, nargs="+", default=[4.0])
    parser.add_argument("--set", choices=("dev", "validation"), default="dev")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="training checkpoint to sample its EMA weights instead")
    parser.add_argument("--weak", action="store_true", help="sample the weak model (with the main text encoder)")
    parser.add_argument("--grid", help="save the images of the first cfg scale as a PNG grid here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    dit, text_encoder = load_models(args.checkpoint)
    if args.weak:
        dit = weights.load_weak()
    prompt_set = scenes.dev_prompts() if args.set == "dev" else scenes.validation_prompts()
    prompts = [prompt for prompt, _ in prompt_set] * args.samples
    specs = [spec for _, spec in prompt_set] * args.samples
    for index, cfg in enumerate(args.cfg):
        images = np.concatenate([euler_sample(dit, text_encoder, prompts[i:i + len(prompt_set)], cfg, args.steps,
                                              args.seed + i // len(prompt_set))
                                 for i in range(0, len(prompts), len(prompt_set))])
        if args.grid and index == 0:
            save_grid(images, args.grid)
        print(json.dumps({"cfg": cfg, "set": args.set, "steps": args.steps, "rates": oracle_rates(images, specs)}))


if __name__ == "__main__":
    main()
