"""Adaptive Guidance (AG): stop evaluating the unconditional once it stops mattering.

Castillo et al., "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models",
arXiv 2312.12487, Sec. 4 (the AG policy): with γ_t = cos(ε(x_t, c), ε(x_t, ∅)) over the flattened
prediction, sample with CFG while γ_t < γ̄ and with the conditional prediction alone from the first
step where γ_t ≥ γ̄ on (1 model row per step instead of 2).

Choices this module makes where the paper leaves room:

* Per sample.  γ is one cosine per sample of the batch (never one for the whole batch); each sample
  switches on its own and only switched samples' unconditional rows are dropped.
* Keyed to the noise level.  A sample whose γ reaches γ̄ at an evaluation of noise level σ_s keeps
  CFG for that evaluation (both predictions are already paid for) and skips its unconditional at
  every later evaluation with σ < σ_s.  Multi-evaluation samplers (Heun, DPM++ 2S, ...) and any
  schedule therefore follow the same rule; a sampler that re-noises above σ_s evaluates CFG again.
* Window.  A switch may only *begin* while start_sigma ≥ σ ≥ end_sigma (the node maps ComfyUI's
  start/end percent to sigmas); a sample that has not switched by the end of the window keeps CFG.
  γ̄ = 1.0 never switches (so it reproduces plain CFG exactly, whatever the rounding of γ).
* Quantity.  ComfyUI's models return denoised predictions D(x; σ); from them, with the model's
  forward process x = a(σ)·x0 + b(σ)·ε, the cosine is taken on one of:

  - ``noise``: ε̂ = (x − a·D)/b, the paper's ε (ε-prediction models' own output; b is one
    scalar per evaluation, so the cosine is taken on x − a·D);
  - ``denoised``: D itself, x̂0 (what the SDXL ports switched to);
  - ``guidance``: cos(D_c, D_c + (s − 1)(D_c − D_u)), how far the guidance difference at the
    actual CFG scale s turns the denoised prediction (1 when s = 1, scale-aware otherwise).

  ``DEFAULT_QUANTITY`` holds the measured default per model family (see its comment).
"""
import torch

from .similarity import per_sample_cosine

QUANTITIES = ("noise", "denoised", "guidance")

# Measured with bench/adaptive_guidance.py --families (README, Adaptive Guidance): the trained toy
# denoiser sampled as a flow model and re-expressed as an ε-/v-prediction model on the SD schedule.
# ``noise`` is unusable for both: at the first evaluation x̂ε is dominated by x itself (σ = 1 for
# flow: ε̂ = x exactly), cos starts at 0.9999+ and *falls* over the run, so every γ̄ < 1 switches
# after step 1.  ``denoised`` and ``guidance`` trade rows for quality identically (same distance to
# CFG at equal savings); ``guidance`` is the default for every family because its γ spans ~10x
# more of [0, 1] (γ̄ ≈ 0.98 rather than 0.998) and it follows the CFG scale (s = 1 never guides).
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


def validate_threshold(threshold: float, technique: str = "Adaptive Guidance") -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{technique}: threshold must be in [0, 1], got {threshold}")
    return float(threshold)


def validate_window(start_percent: float, end_percent: float, technique: str = "Adaptive Guidance") -> None:
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"{technique}: need 0 <= start_percent <= end_percent <= 1, "
                         f"got start_percent={start_percent}, end_percent={end_percent}")


class SwitchState:
    """Per-run, per-sample switch record: σ_s of each sample (−inf while it has not switched)."""

    def __init__(self, threshold: float, start_sigma: float = float("inf"), end_sigma: float = 0.0):
        self.threshold = validate_threshold(threshold)
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


def evaluate_skipping(evaluate, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional for every sample, unconditional only where ``skip`` (bool [B]) is False.

    ``evaluate(with_cond, with_uncond, rows)`` returns (cond, uncond) predictions for the sample
    indices ``rows`` (None: the whole batch; an entry not asked for may be anything).  While no
    sample skips this is one batched [cond, uncond] evaluation, as in plain CFG.  The returned
    unconditional holds a copy of the conditional for skipped samples, so the CFG combine gives
    exactly the conditional there (cfg = 1 for those samples)."""
    if not skip.any():
        return evaluate(True, True, None)
    cond, _ = evaluate(True, False, None)
    uncond = cond.clone()
    keep = (~skip).nonzero().flatten()
    if keep.numel():
        uncond[keep.to(cond.device)] = evaluate(False, True, keep)[1]
    return cond, uncond
