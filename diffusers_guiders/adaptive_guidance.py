"""Adaptive Guidance as a diffusers guider (``samplers/adaptive_guidance.py``'s rule and similarity)."""
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..samplers import adaptive_guidance as ag
from .row_skipping import evaluate_rows, release_rows
from .runs import FreshEachRun, per_sample

# The guider sees the model's raw output p (ε, v or flow velocity), not ComfyUI's denoised prediction:
# "prediction" is cos(p_c, p_u) (for an ε model the paper's γ_t = cos(ε_c, ε_u)); "guidance" is
# cos(p_c, p_c + (s − 1)(p_c − p_u)).  Both are samplers' formulas applied to p.
QUANTITIES = {"prediction": "denoised", "guidance": "guidance"}


class AdaptiveGuidance(FreshEachRun, ClassifierFreeGuidance):
    """Classifier-free guidance that stops evaluating the unconditional once it agrees with the conditional.

    [Adaptive Guidance](https://arxiv.org/abs/2312.12487) (Castillo et al., Sec. 4): with γ_t the cosine
    between the conditional and unconditional predictions, sample with CFG while γ_t < γ̄ and with the
    conditional alone from the first step where γ_t ≥ γ̄ on.  The rule is per sample (a sample that has
    switched continues on its conditional); the unconditional pass is skipped (``num_conditions`` 1) once
    every sample of the batch has switched, and with ``skip_rows`` the unconditional pass before that runs
    the denoiser on the rows that still need it only (a ``diffusers.hooks`` hook slices every batch-sized
    input).  ``switch_log`` records each switch of the current run.

    Args:
        guidance_scale (`float`, defaults to `7.5`): CFG scale while guidance is on.
        threshold (`float`, defaults to `0.99`): γ̄ in [0, 1]; 1.0 never switches (exactly
            ``ClassifierFreeGuidance``).
        quantity (`str`, defaults to `"guidance"`): what the cosine is taken on, `"prediction"` or
            `"guidance"` (see ``QUANTITIES``).
        switch_start (`float`, defaults to `0.0`): fraction of the steps before which no sample switches.
        switch_end (`float`, defaults to `1.0`): fraction of the steps after which no switch begins.
        skip_rows (`bool`, defaults to `False`): evaluate the unconditional on the unswitched samples only
            (the same images; less compute for a batch whose samples switch at different steps).
        guidance_rescale, use_original_formulation, start, stop, enabled: as ``ClassifierFreeGuidance``.
    """

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, threshold: float = 0.99, quantity: str = "guidance",
                 switch_start: float = 0.0, switch_end: float = 1.0, skip_rows: bool = False,
                 guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         use_original_formulation=use_original_formulation, start=start, stop=stop, enabled=enabled)
        if quantity not in QUANTITIES:
            raise ValueError(f"AdaptiveGuidance: quantity must be one of {list(QUANTITIES)}, got {quantity!r}")
        if not 0.0 <= switch_start <= switch_end <= 1.0:
            raise ValueError(f"AdaptiveGuidance: need 0 <= switch_start <= switch_end <= 1, got {switch_start}, "
                             f"{switch_end}")
        self.threshold, self.quantity, self.skip_rows = threshold, quantity, skip_rows
        # Noise levels are 1 − step/steps (decreasing like σ), so the switch window is [1 − end, 1 − start].
        self._window = (1.0 - switch_start, 1.0 - switch_end)
        self.start_run()

    def start_run(self) -> None:
        self._switch = ag.SwitchState(self.threshold, *self._window)
        self.switch_log: list[dict] = []

    def _noise_level(self) -> float:
        if self._step is None or not self._num_inference_steps:
            return float("inf")
        return 1.0 - self._step / self._num_inference_steps

    def _all_switched(self) -> bool:
        switched = self._switch.switch_sigma
        return switched is not None and bool((self._noise_level() < switched).all())

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() and not self._all_switched() else 1

    def _rows_to_skip(self) -> torch.Tensor | None:
        """Bool [B] of the samples whose unconditional this step skips (None before the first batch is seen)."""
        switched = self._switch.switch_sigma
        return None if switched is None else self._noise_level() < switched

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        skipped = self._rows_to_skip()
        if self.skip_rows and self.is_unconditional and skipped is not None and skipped.any():
            evaluate_rows(denoiser, ~skipped)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        release_rows(denoiser)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)
        guided = super().forward(pred_cond, pred_uncond)
        level = self._noise_level()
        skipped = self._switch.skipped(level, pred_cond.shape[0])
        cfg_scale = self.guidance_scale + (1.0 if self.use_original_formulation else 0.0)
        gamma = ag.similarity(QUANTITIES[self.quantity], None, pred_cond, pred_uncond, cfg_scale=cfg_scale)
        switching = self._switch.observe(level, gamma, ~skipped)
        if switching:
            self.switch_log.append({"step": self._step, "samples": switching,
                                    "cosine": [float(gamma[i]) for i in switching]})
        if not skipped.any():
            return guided
        pred = torch.where(per_sample(skipped, pred_cond), pred_cond, guided.pred)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
