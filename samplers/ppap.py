"""PPAP: plug-and-play classifier guidance through noise-range experts (Go et al., "Towards Practical
Plug-and-Play Diffusion Models", CVPR 2023, arXiv 2212.05973; official code riiid/PPAP).

An off-the-shelf classifier ``f`` (trained on clean images) gives poor gradients on noisy inputs.
PPAP trains N *experts*, each ``f`` plus LoRA adapters (``samplers/lora.py``; Sec. 4.2), on the
noise range it will guide in (Sec. 4.1: the diffusion timesteps split evenly, ``[0, T/N]``,
``[T/N, 2T/N]``, ...; a boundary goes to the lower expert), *data-free* (Sec. 4.3): clean samples
``x0`` come from the diffusion model itself, the teacher is ``f`` on ``x0``, the student sees the
noised ``x_t`` of the same sample, and the loss is the distillation KL of Eq. 6,

    L = KL( softmax(f(x0) / τ) ‖ softmax(f_k(x_t)) ),   τ = 0.25,

summed over the classifier's heads here.  Experts train one after another, each starting from the
previous one's weights.  Guidance (Sec. 3, Eq. 3) uses the expert whose range holds the current
noise level, per sample, with gradient scale ``s``:

    ∇ log p(x_t | y) = ∇ log p(x_t) + s · ∇_x log softmax(f_k(x_t))_y.

Noise levels here are the diffusion model's own ``sigma`` (ComfyUI's), so eps, v and flow models
are all covered: the model's forward process is ``x = α(σ)·x0 + σ_t(σ)·n`` (eps and v: α = 1,
σ_t = σ; rectified flow: α = 1 − σ, σ_t = σ), and what the classifier sees of ``x`` is the
caller's ``classifier_input(x, sigma)`` (e.g. ComfyUI's ``calculate_input``, an optional VAE
decode, and the classifier's normalisation), the same map in training and in guidance.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .lora import with_parameters

TEACHER_TEMPERATURE = 0.25
DEFAULT_EXPERTS = 5
DEFAULT_SCALE = 7.5
# Below this signal coefficient α the guided denoised prediction is capped (flow models at σ → 1).
MIN_SIGNAL = 0.05


def distillation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                      temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """PPAP Eq. 6 summed over heads: Σ_h mean_batch KL(softmax(teacher_h / τ) ‖ softmax(student_h))."""
    return sum(F.kl_div(F.log_softmax(student[head], dim=-1), F.log_softmax(teacher[head].detach() / temperature, dim=-1),
                        reduction="batchmean", log_target=True)
               for head in teacher)


def timestep_ranges(num_timesteps: int, experts: int) -> list[tuple[int, int]]:
    """PPAP Sec. 4.1: the timesteps 0..T−1 split evenly into ``experts`` inclusive index ranges
    sharing their boundaries (``[0, 200], [200, 400], ..., [800, 999]`` for T = 1000, N = 5)."""
    if experts < 1 or experts > num_timesteps - 1:
        raise ValueError(f"experts must lie in 1..{num_timesteps - 1}, got {experts}")
    edges = [round(k * (num_timesteps - 1) / experts) for k in range(experts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def sigma_ranges(schedule_sigmas: torch.Tensor, experts: int) -> torch.Tensor:
    """[N, 2] (low, high) sigmas of the experts from the model's ascending per-timestep sigmas; the
    lowest range starts at 0 (a clean image belongs to the least-noisy expert)."""
    ranges = torch.tensor([[schedule_sigmas[low], schedule_sigmas[high]]
                           for low, high in timestep_ranges(len(schedule_sigmas), experts)], dtype=torch.float32)
    ranges[0, 0] = 0.0
    return ranges


def check_ranges(ranges: torch.Tensor) -> None:
    """Raise ValueError unless ``ranges`` [N, 2] are finite, ascending and contiguous from 0."""
    if ranges.ndim != 2 or ranges.shape[1] != 2 or not len(ranges):
        raise ValueError(f"noise ranges must be [N, 2], got {tuple(ranges.shape)}")
    if not bool(torch.isfinite(ranges).all()) or float(ranges[0, 0]) != 0.0:
        raise ValueError("noise ranges must be finite and start at sigma 0")
    if not bool((ranges[:, 1] > ranges[:, 0]).all()) or not torch.equal(ranges[1:, 0], ranges[:-1, 1]):
        raise ValueError(f"noise ranges must be ascending and contiguous, got {ranges.tolist()}")


def choose_experts(sigma: torch.Tensor, ranges: torch.Tensor, tolerance: float = 1e-4) -> torch.Tensor:
    """Per-sample expert index: the first range whose upper bound ≥ σ (a boundary goes to the lower
    expert); ``-1`` where σ lies above the last range by more than ``tolerance`` (relative)."""
    upper = ranges[:, 1].to(sigma).contiguous()
    index = torch.searchsorted(upper, sigma.contiguous(), right=False)
    inside_last = sigma <= upper[-1] * (1 + tolerance)
    return torch.where(index < len(upper), index, torch.where(inside_last, len(upper) - 1, -1))


def sample_training_sigmas(schedule_sigmas: torch.Tensor, timestep_range: tuple[int, int], count: int,
                           generator: torch.Generator) -> torch.Tensor:
    """``count`` sigmas at timesteps drawn uniformly from the inclusive ``timestep_range`` (Sec. 4.3)."""
    low, high = timestep_range
    steps = torch.randint(low, high + 1, (count,), generator=generator)
    return schedule_sigmas[steps].float()


def forward_process(alpha: torch.Tensor, noise_std: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x = α·x0 + σ_t·n, α and σ_t per sample [B]."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return alpha.view(shape) * x0 + noise_std.view(shape) * noise


def denoised_guidance(gradient: torch.Tensor, alpha: torch.Tensor, noise_std: torch.Tensor, scale: float) -> torch.Tensor:
    """What classifier guidance adds to the denoised prediction: s·σ_t² / max(α, MIN_SIGNAL) · g.

    Derivation.  ComfyUI's model returns D(x, σ) ≈ E[x0 | x] for the forward process
    x = α·x0 + σ_t·n.  Tweedie's formula gives E[x0 | x] = (x + σ_t²·∇_x log p(x)) / α, so replacing
    the score by the guided score ∇ log p(x) + s·g, with g = ∇_x log p(y | x) (the classifier's
    log-probability of the target differentiated through ``classifier_input`` with respect to the
    sampler's own x), changes D by s·σ_t²/α·g.  In ε form the same change reads
    ε̂' = ε̂ − s·σ_t·g (PPAP's DDIM form ε̂ − √(1−ᾱ)·∇, since for eps and v models x = x_VP/√ᾱ,
    σ_t = σ, σ² = (1−ᾱ)/ᾱ and ∇_x = √ᾱ·∇_{x_VP}).  eps and v models (x = x0 + σ·n): ΔD = s·σ²·g;
    rectified flow (x = (1−σ)·x0 + σ·n): ΔD = s·σ²/(1−σ)·g, which diverges at σ = 1 where x holds
    no information on x0, hence the cap α ≥ MIN_SIGNAL (it only acts above σ = 0.95 there).
    ``gradient`` [B, ...]; ``alpha``, ``noise_std`` [B]."""
    shape = (-1,) + (1,) * (gradient.ndim - 1)
    factor = noise_std.to(gradient) ** 2 / alpha.to(gradient).clamp(min=MIN_SIGNAL)
    return scale * factor.view(shape) * gradient


@dataclass
class ExpertClassifier:
    """A classifier ``network`` (wrapped by ``lora.add_lora``) with one parameter set per noise range.

    ``experts[k]`` maps trainable parameter names to expert k's tensors (the rest of the network is
    the shared base); ``ranges`` [N, 2] are the sigma ranges; ``heads`` maps each output head to its
    class names.  An empty parameter set is the base network itself (naive guidance with the
    off-the-shelf classifier is one empty expert over [0, ∞))."""

    network: nn.Module
    experts: list[dict[str, torch.Tensor]]
    ranges: torch.Tensor
    heads: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        check_ranges(self.ranges)
        if len(self.experts) != len(self.ranges):
            raise ValueError(f"{len(self.experts)} experts for {len(self.ranges)} noise ranges")

    def logits(self, x: torch.Tensor, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s logits per head for classifier inputs ``x``."""
        return with_parameters(self.network, self.experts[expert], x)

    def target_index(self, head: str, class_name: str) -> int:
        if head not in self.heads:
            raise KeyError(f"unknown head {head!r} (heads: {', '.join(self.heads)})")
        if class_name not in self.heads[head]:
            raise KeyError(f"unknown class {class_name!r} of head {head!r} (classes: {', '.join(self.heads[head])})")
        return self.heads[head].index(class_name)

    def guidance_gradient(self, x: torch.Tensor, sigma: torch.Tensor, classifier_input, head: str, target: int):
        """(g, p, k): per sample g = ∇_x log softmax(f_k(classifier_input(x, σ)))_target [B, ...],
        the target's probability p [B] and the expert index k [B] (ValueError for a σ outside every
        range).  Leaves ``torch.inference_mode`` (ComfyUI samples inside it) and works on clones."""
        experts = choose_experts(sigma, self.ranges)
        if bool((experts < 0).any()):
            raise ValueError(f"sigma {float(sigma.max()):.4g} lies above the experts' noise ranges "
                             f"(up to {float(self.ranges[-1, 1]):.4g})")
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            sigma = sigma.detach().clone()
            log_prob = torch.zeros(len(x), dtype=x.dtype, device=x.device)
            for expert in experts.unique().tolist():
                rows = (experts == expert).nonzero().flatten()
                inputs = classifier_input(x[rows], sigma[rows])
                log_prob = log_prob.index_put((rows,), F.log_softmax(self.logits(inputs, expert)[head], dim=-1)[:, target])
            gradient, = torch.autograd.grad(log_prob.sum(), x)
        return gradient.detach(), log_prob.detach().exp(), experts


def normal_tensors(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, with any created under ``torch.inference_mode`` cloned so autograd may save them."""
    with torch.inference_mode(False):
        return {name: value.clone() if value.is_inference() else value for name, value in parameters.items()}


def guided_denoised(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, alpha: torch.Tensor,
                    noise_std: torch.Tensor, classifier: ExpertClassifier, classifier_input, head: str, target: int,
                    scale: float):
    """(D + s·σ_t²/α·g, g, p, k) for ComfyUI's denoised prediction ``denoised`` at ``x`` and σ [B]
    (``denoised_guidance``, ``ExpertClassifier.guidance_gradient``)."""
    gradient, probability, experts = classifier.guidance_gradient(x, sigma, classifier_input, head, target)
    return denoised + denoised_guidance(gradient, alpha, noise_std, scale).to(denoised), gradient, probability, experts


def gradient_norms(gradient: torch.Tensor) -> list[float]:
    """Per-sample L2 norm of a gradient, as floats (the run record's signal)."""
    return gradient.flatten(1).norm(dim=1).tolist()
