"""Autoguidance ("Guiding a Diffusion Model with a Bad Version of Itself", Karras et al., NeurIPS
2024, Eq. 1; official NVlabs/edm2 ``generate_images.py``: ``ref_Dx.lerp(Dx, w)``).

The guide is a weaker version of the same model (smaller, shorter-trained) given the *same*
conditioning, in place of CFG's unconditional:

    D_w(x; c) = D_weak(x; c) + w · (D_main(x; c) − D_weak(x; c)),   w ≈ 1.7–2.9 in the paper's presets.

Cost: one main row and one weak row per sample and evaluation (CFG: two main rows).
"""
import torch


def autoguide(main: torch.Tensor, weak: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """D_weak + w·(D_main − D_weak); ``weight`` a float or per-sample [B]."""
    if isinstance(weight, torch.Tensor):
        weight = weight.to(main.dtype).view(-1, *([1] * (main.ndim - 1)))
    return weak + weight * (main - weak)
