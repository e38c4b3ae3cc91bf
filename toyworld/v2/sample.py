"""Pure-torch Euler sampling of the toy world v2 latent DiT with classifier-free guidance, judged by
the oracle: the world's headroom figures.

    python -m toyworld.v2.sample --cfg 1 4 --set validation [--samples 2] [--weights DIR] [--weak]

prints one JSON line per cfg scale: per kind the oracle's pass rate and per-fact rates (``n`` images).
Sampling follows the training parametrisation: x starts as N(0, I) at sigma 1, ``--steps`` Euler
steps on sigmas linspace(1, 0), guided velocity v_u + cfg (v_c - v_u) with the empty prompt as the
unconditional, then latent / scale + shift and the VAE decoder.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see train.py)

import argparse
import itertools
import json
import sys

import numpy as np
import torch

from .. import sample as v1_sample
from . import model, oracle, scenes, weights

SETS = {"dev": scenes.DEV, "validation": scenes.VALIDATION}


class LatentWorld:
    """The shipped models of one weights directory, on one device."""

    def __init__(self, directory=weights.WEIGHTS_DIR, device="cpu", weak=False):
        self.device = torch.device(device)
        self.vae, vae_metadata = weights.load("vae", directory)
        self.text_encoder, _ = weights.load("text_encoder", directory)
        self.dit, _ = weights.load("weak" if weak else "dit", directory)
        for module in (self.vae, self.text_encoder, self.dit):
            module.to(self.device)
        self.shift = float(vae_metadata["latent_shift"])
        self.scale = float(vae_metadata["latent_scale"])

    @torch.no_grad()
    def sample(self, prompts, cfg=4.0, steps=20, seed=0):
        """uint8 [B, 64, 64, 3] images for ``prompts``."""
        context, pooled = model.encode_text(self.text_encoder, model.tokens(prompts, self.device))
        empty_context, empty_pooled = model.encode_text(self.text_encoder,
                                                        model.tokens([""] * len(prompts), self.device))
        size = scenes.IMAGE_SIZE // model.LATENT_DOWNSCALE
        x = torch.randn(len(prompts), model.LATENT_CHANNELS, size, size,
                        generator=torch.Generator().manual_seed(seed)).to(self.device)
        for sigma, sigma_next in itertools.pairwise(torch.linspace(1.0, 0.0, steps + 1).tolist()):
            sigmas = torch.full((len(prompts),), sigma, device=self.device)
            v_cond = model.velocity(self.dit, x, sigmas, context, pooled)
            if cfg == 1.0:
                v = v_cond
            else:
                v_uncond = model.velocity(self.dit, x, sigmas, empty_context, empty_pooled)
                v = v_uncond + cfg * (v_cond - v_uncond)
            x = x + (sigma_next - sigma) * v
        images = model.decode_latents(self.vae, x / self.scale + self.shift)
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def oracle_rates(images, specs):
    """{kind: {"n": count, fact: rate, ..., "pass": rate}} over images judged by the v2 oracle."""
    return v1_sample.oracle_rates(images, specs, oracle.judge)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--set", choices=tuple(SETS), default="validation")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=str(weights.WEIGHTS_DIR))
    parser.add_argument("--weak", action="store_true", help="sample the weak (Autoguidance) model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    world = LatentWorld(args.weights, args.device, args.weak)
    prompt_set = scenes.prompt_set(SETS[args.set])
    prompts, specs = [p for p, _ in prompt_set], [s for _, s in prompt_set]
    for cfg in args.cfg:
        images = np.concatenate([world.sample(prompts, cfg, args.steps, args.seed + i) for i in range(args.samples)])
        sys.stdout.write(json.dumps({"cfg": cfg, "set": args.set, "steps": args.steps, "weak": args.weak,
                                     "rates": oracle_rates(images, specs * args.samples)}) + "\n")


if __name__ == "__main__":
    main()
