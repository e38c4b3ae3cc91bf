"""Adaptive Guidance (AG): stop evaluating the unconditional once it stops mattering.

Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv 2312.12487, Sec. 4 (the AG policy): with γ_t = cos(ε(x_t, c), ε(x_t, ∅)), sample with CFG
while γ_t < γ̄ and with the conditional alone from the first step where γ_t ≥ γ̄ on.

Per sample and keyed to the noise level: a sample whose γ reaches γ̄ at noise level σ_s keeps
CFG at that evaluation and skips its unconditional at every later one with σ < σ_s (so any
sampler and schedule follow one rule); a switch may only begin inside [end_sigma, start_sigma];
γ̄ = 1 never switches.  Quantities, from denoised predictions D and x = a(σ)·x0 + b(σ)·ε:
``noise`` cos(x − a·D_c, x − a·D_u) (the paper's ε), ``denoised`` cos(D_c, D_u), ``guidance``
cos(D_c, D_c + (s − 1)(D_c − D_u)) at CFG scale s.
"""
import torch

from .similarity import per_sample_cosine

QUANTITIES = ("noise", "denoised", "guidance")

# Default per family: README, Adaptive Guidance (bench/adaptive_guidance.py --families).
DEFAULT_QUANTITY = {"eps": "guidance", "v": "guidance", "flow": "guidance"}
FALLBACK_QUANTITY = "guidance"


def default_quantity(family: str) -> str:
    """The documented default quantity for a model family ("eps", "v", "flow"; others: guidance)."""
    return DEFAULT_QUANTITY.get(family, FALLBACK_QUANTITY)


def similarity(quantity: str, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *,
               signal_scale: float = 1.0, cfg_scale: float = 1.0) -> torch.Tensor:
    """Per-sample cosine γ between conditional and unconditional denoised predictions [B, ...] -> [B].

    ``signal_scale`` is a(σ) of x = a·x0 + b·ε (used by ``noise``);
    ``cfg_scale`` is the guidance scale s (used by ``guidance``)."""
    if quantity == "denoised":
        return per_sample_cosine(cond, uncond)
    if quantity == "noise":
        return per_sample_cosine(x - signal_scale * cond, x - signal_scale * uncond)
    if quantity == "guidance":
        return per_sample_cosine(cond, cond + (cfg_scale - 1.0) * (cond - uncond))
    raise ValueError(f"Adaptive Guidance: quantity must be one of {QUANTITIES}, got {quantity!r}")


class SwitchState:
    """Per-run, per-sample switch record: σ_s of each sample (−inf while it has not switched)."""

    def __init__(self, threshold: float, start_sigma: float = float("inf"), end_sigma: float = 0.0):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"Adaptive Guidance: threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.start_sigma = float(start_sigma)
        self.end_sigma = float(end_sigma)
        self.switch_sigma: torch.Tensor | None = None

    def skipped(self, sigma: float, batch: int) -> torch.Tensor:
        """Bool [B]: samples whose unconditional is not evaluated at noise level ``sigma``."""
        if self.switch_sigma is None or self.switch_sigma.shape[0] != batch:
            self.switch_sigma = torch.full((batch,), float("-inf"), dtype=torch.float64)
        return sigma < self.switch_sigma

    def may_switch(self, sigma: float) -> bool:
        return self.threshold < 1.0 and self.end_sigma <= sigma <= self.start_sigma

    def observe(self, sigma: float, gamma: torch.Tensor, measured: torch.Tensor) -> list[int]:
        """Record γ [B] of the samples in ``measured`` (bool [B]) at ``sigma``; returns the samples
        switching for the first time (a sample measured again above its σ_s raises σ_s)."""
        if not self.may_switch(sigma):
            return []
        switching = measured & (gamma.double().cpu() >= self.threshold) & (self.switch_sigma < sigma)
        first = switching & torch.isinf(self.switch_sigma)
        self.switch_sigma[switching] = sigma
        return first.nonzero().flatten().tolist()
