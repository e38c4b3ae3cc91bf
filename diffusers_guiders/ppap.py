"""PPAP's expert classifier guidance as a diffusers guider (``samplers/ppap.py``)."""
import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..samplers import ppap
from .latents import SeesLatents
from .runs import FreshEachRun, in_window

WHERE = "PPAP (diffusers)"


def the_latents(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The default ``read_pixels``: the experts read the pipeline's latents as they are."""
    return latents


class PPAP(SeesLatents, FreshEachRun, ClassifierFreeGuidance):
    """CFG plus classifier guidance toward a class by the expert whose noise range holds the step's σ.

    [Towards Practical Plug-and-Play Diffusion Models](https://arxiv.org/abs/2212.05973) (Go et al., CVPR 2023,
    Sec. 3 Eq. 3, experts per noise range Sec. 4.1): each step inside the window, the CFG output's clean estimate
    x̂₀ becomes x̂₀ + s·σ_t²/α·∇_x log p_k(y | x) (``samplers.ppap.guided_denoised``, the nodes' post-CFG step),
    the gradient taken with respect to the step's latent x through ``read_pixels`` and the expert k whose σ range
    holds the step's σ, and is handed back as the model's raw output.  The gradient is taken under
    ``torch.enable_grad()`` (the pipeline runs the guider under ``torch.no_grad()``).  Needs each step's latent
    and σ: build the pipeline with ``show_latents``.  ``guidance_log`` lists each guided step of the current run
    (step, σ, and per sample the expert, the target's probability and the gradient norm).

    Args:
        experts (`samplers.ppap.ExpertClassifier`): the experts and their σ ranges, e.g. ``ppap.load_experts``
            (a bundle of the ``PPAP Train Experts`` node), ``ppap.naive_classifier``, or
            ``ExpertClassifier(network, [{}], torch.tensor([[0.0, math.inf]]))`` for one network returning
            ``{head: logits}`` over every σ; not part of the config.
        read_pixels (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`, optional): (latents x, σ [B]) to
            the experts' input (images in [-1, 1] before ``experts.prepare``), differentiable; defaults to the
            latents themselves; not part of the config.
        head (`str`): the output head of the experts that holds the target class.
        target (`int`): the target class index in ``head``.
        scale (`float`, defaults to `7.5`): gradient scale s (the paper's 7.5; 0 is exactly CFG).
        guidance_scale (`float`, defaults to `7.5`): CFG scale.
        guidance_rescale, use_original_formulation, start, stop, enabled: as ``ClassifierFreeGuidance``; PPAP
            acts inside the same window.
    """

    ignore_for_config = ["experts", "read_pixels"]
    # Not config (objects): from_config / from_pretrained hand these keywords to __init__ through diffusers'
    # `_deprecated_kwargs` route, its one way for an init argument that is not in the config.
    _deprecated_kwargs = ["experts", "read_pixels"]

    @register_to_config
    def __init__(self, experts: ppap.ExpertClassifier = None, read_pixels=None, head: str = None, target: int = 0,
                 scale: float = 7.5, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         use_original_formulation=use_original_formulation, start=start, stop=stop, enabled=enabled)
        if not isinstance(experts, ppap.ExpertClassifier):
            raise ValueError(f"{WHERE}: 'experts' must be a samplers.ppap.ExpertClassifier (ppap.load_experts, "
                             "ppap.naive_classifier, or ExpertClassifier(network, [{}], torch.tensor([[0.0, "
                             f"math.inf]])) for one network over every sigma), got {type(experts).__name__}")
        if read_pixels is not None and not callable(read_pixels):
            raise ValueError(f"{WHERE}: 'read_pixels' must be a callable (latents, sigma) -> the experts' input")
        if not isinstance(head, str) or (experts.heads and head not in experts.heads):
            raise ValueError(f"{WHERE}: 'head' must name an output head of the experts "
                             f"({sorted(experts.heads) or 'the keys of their logits'}), got {head!r}")
        classes = len(experts.heads.get(head, ())) or math.inf
        if not 0 <= target < classes:
            raise ValueError(f"{WHERE}: 'target' {target} is not a class index of head {head!r}")
        if not 0.0 <= scale < math.inf:
            raise ValueError(f"{WHERE}: 'scale' must be finite and >= 0, got {scale}")
        self.experts, self.read_pixels = experts, read_pixels or the_latents
        self.head, self.target, self.scale = head, target, scale
        self.start_run()

    def new(self, **kwargs) -> "PPAP":
        """A copy (``BaseGuidance.new``) that keeps this guider's experts and pixel reader unless given others."""
        kwargs.setdefault("experts", self.experts)
        kwargs.setdefault("read_pixels", self.read_pixels)
        return super().new(**kwargs)

    def start_run(self) -> None:
        self.guidance_log: list[dict] = []

    def _guides(self) -> bool:
        return self.scale > 0 and in_window(self)

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if self._sample is None:
            self.take_sample(WHERE)  # raises: the pipeline shows no latents
        sigma = self._sample.sigma
        if self._guides() and int(ppap.choose_experts(torch.tensor([sigma]), self.experts.ranges)[0]) < 0:
            raise ValueError(f"{WHERE} 'experts': step {step} is at sigma {sigma:.4g}, above the experts' noise "
                             f"ranges (sigma 0 to {float(self.experts.ranges[-1, 1]):.4g}); use experts trained "
                             "on this model's schedule, or start guiding later ('start')")

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        output = super().forward(pred_cond, pred_uncond)
        sample = self.take_sample(WHERE)
        if not self._guides():
            return output
        x = sample.latents
        sigma = torch.full((len(x),), float(sample.sigma), device=x.device)
        alpha, noise_std = (torch.full_like(sigma, value) for value in sample.forward_process())
        guided, gradient, probability, experts = ppap.guided_denoised(
            sample.denoised(output.pred), x, sigma, alpha, noise_std, self.experts, self.read_pixels, self.head,
            self.target, self.scale)
        self.guidance_log.append({"step": self._step, "sigma": float(sample.sigma), "experts": experts.tolist(),
                                  "target_probability": probability.tolist(),
                                  "gradient_norm": ppap.gradient_norms(gradient)})
        return GuiderOutput(pred=sample.output(guided), pred_cond=pred_cond, pred_uncond=pred_uncond)
