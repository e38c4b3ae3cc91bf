"""LinearAG as a diffusers guider, and its calibration on a diffusers pipeline (``samplers/linear_ag.py``)."""
import logging

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..samplers import linear_ag as lag
from ..samplers.bundles import fingerprint
from .latents import SeesLatents
from .runs import FreshEachRun

logger = logging.getLogger(__name__)
WHERE = "LinearAG (diffusers)"
# Calibrations fitted on what a diffusers guider sees, the model's raw output (ε, v, velocity); the
# ComfyUI nodes fit on ComfyUI's denoised predictions, where the same coefficients mean something else.
PREDICTION_SPACE = "model_output"


SIGMA_RTOL = 1e-4  # as the nodes' check of each evaluation's sigma


def load_calibration(path) -> lag.Calibration:
    """``samplers.linear_ag.Calibration.load`` plus the checks of a diffusers guider: a file fitted on the raw model
    output (``calibrate_linear_ag``) has no latent terms (its guider may not be shown the latents)."""
    calibration = lag.Calibration.load(path, WHERE)
    needs_latent = [term for term in calibration.terms if term.endswith("x")]
    if not on_denoised(calibration) and needs_latent:
        raise ValueError(f"{WHERE}: {path}: terms {needs_latent} need the latent, in a calibration of the raw "
                         "model output")
    return calibration


def on_denoised(calibration: lag.Calibration) -> bool:
    """Whether ``calibration`` was fitted on denoised predictions (the ComfyUI nodes' files) rather than on the
    model's raw output (``calibrate_linear_ag``'s)."""
    return calibration.info.get("prediction_space") != PREDICTION_SPACE


# The denoiser's text conditioning, as the Modular denoise blocks name it (SDXL; SD3, Flux, Wan, ...).
TEXT_FIELDS = ("prompt_embeds", "encoder_hidden_states")


class ReadsNegative:
    """Mixin for a CFG guider: at step 0, ``observe_negative`` gets the fingerprint
    (``linear_ag.conditioning_fingerprint``) of the negative's text conditioning, the unconditional half of
    the first of ``TEXT_FIELDS`` the pipeline hands the guider (empty when there is none; its first row when
    every row of the batch is the same negative)."""

    def prepare_inputs(self, data: dict) -> list:
        if self._step == 0:
            self._read_negative({name: value[1] for name, value in data.items() if isinstance(value, tuple)})
        return super().prepare_inputs(data)

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        if self._step == 0:
            self._read_negative({name: getattr(data, field[1], None) for name, field in input_fields.items()
                                 if isinstance(field, tuple)})
        return super().prepare_inputs_from_block_state(data, input_fields)

    def _read_negative(self, unconditional: dict) -> None:
        text = next((unconditional[name] for name in TEXT_FIELDS if unconditional.get(name) is not None), None)
        if text is not None and all(torch.equal(text[0], row) for row in text[1:]):
            text = text[:1]  # one negative for the whole batch, fingerprinted once (as the nodes' conditioning)
        self.observe_negative(lag.conditioning_fingerprint([] if text is None else [text]))

    def observe_negative(self, fingerprint: torch.Tensor) -> None:
        raise NotImplementedError


class LinearAG(SeesLatents, ReadsNegative, FreshEachRun, ClassifierFreeGuidance):
    """CFG whose unconditional is, on most guided steps, regressed from earlier steps of the same trajectory.

    [Adaptive Guidance](https://arxiv.org/abs/2312.12487) (Castillo et al., Sec. 5, LinearAG): the first
    ``guided_until`` of the steps are guided, with a true unconditional pass every ``true_every``-th step
    (the anchor) and a regressed one, û = Σ_k w_k·term_k (per channel, fitted offline by least squares),
    in between; the rest run the conditional alone.  The coefficients come from a calibration file in the
    ComfyUI nodes' format: one written by ``calibrate_linear_ag`` (fitted on the raw model output), or one
    written by the ComfyUI nodes (fitted on denoised predictions x̂₀; the guider then needs each step's latent
    and σ, from a pipeline built with ``show_latents``, and regresses on x̂₀ as the nodes do).  A run whose
    step count, timesteps (sigmas, for a ComfyUI file) or negative prompt differ from the calibrated ones warns
    once and samples with true CFG.

    Args:
        calibration (`str`): path of the calibration file.
        guidance_scale (`float`, defaults to `7.5`): CFG scale (calibrate at the scale you sample with).
        true_every (`int`, defaults to `2`): a true unconditional every this many guided steps.
        guided_until (`float`, defaults to `0.5`): fraction of the steps that are guided.
        guidance_rescale, use_original_formulation, start, stop, enabled: as ``ClassifierFreeGuidance``.
    """

    @register_to_config
    def __init__(self, calibration: str = None, guidance_scale: float = 7.5, true_every: int = 2,
                 guided_until: float = 0.5, guidance_rescale: float = 0.0, use_original_formulation: bool = False,
                 start: float = 0.0, stop: float = 1.0, enabled: bool = True):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         use_original_formulation=use_original_formulation, start=start, stop=stop, enabled=enabled)
        if calibration is None:
            raise ValueError(f"{WHERE}: 'calibration' (a file path from calibrate_linear_ag) is required")
        self._calibration = load_calibration(calibration)
        self._pattern = lag.step_pattern(self._calibration.evaluations, true_every, guided_until)
        self.start_run()

    def start_run(self) -> None:
        self._anchor = None    # {"index", "cond", "uncond"} of the last true-CFG step
        self._previous = None  # {"cond"} of the previous step
        self._problem = None

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if self._problem is None:
            self._problem = self._mismatch()
            if self._problem is not None:
                logger.warning(f"{WHERE}: {self._problem}; sampling with true CFG (recalibrate for this setting)")

    def observe_negative(self, fingerprint: torch.Tensor) -> None:
        if self._problem is None and not lag.fingerprints_match(fingerprint, self._calibration.negative_fingerprint):
            self._problem = "the negative prompt differs from the calibrated one"
            logger.warning(f"{WHERE}: {self._problem}; sampling with true CFG (recalibrate for this setting)")

    def _mismatch(self) -> str | None:
        info = self._calibration.info
        if self._num_inference_steps != self._calibration.evaluations:
            return f"{self._num_inference_steps} steps, calibrated {self._calibration.evaluations}"
        if on_denoised(self._calibration):
            return self._sample_mismatch(self._sample)
        calibrated = info["timesteps"][self._step]
        if abs(float(self._timestep) - calibrated) > 1e-3 * max(1.0, abs(calibrated)):
            return f"step {self._step} at timestep {float(self._timestep):.5g}, calibrated {calibrated:.5g}"
        return None

    def _sample_mismatch(self, sample) -> str | None:
        """For a calibration on denoised predictions: this step's sigma and the latent's channels (the nodes'
        checks); an error, before any model call, when the pipeline shows the guider no latents."""
        if sample is None:
            self.take_sample(f"{WHERE} with a ComfyUI calibration")  # raises
        calibrated = float(self._calibration.evaluation_sigmas[self._step])
        if abs(sample.sigma - calibrated) > SIGMA_RTOL * abs(calibrated) + 1e-6:
            return f"step {self._step} at sigma {sample.sigma:.5g}, calibrated {calibrated:.5g}"
        channels = self._calibration.coefficients.shape[2]
        if sample.latents.shape[1] != channels:
            return f"the latent has {sample.latents.shape[1]} channels, calibrated {channels}"
        return None

    def _kind(self) -> str:
        if self._problem is not None or self._step is None:
            return lag.TRUE
        kind = self._pattern[self._step]
        return lag.TRUE if kind == lag.REGRESSED and self._anchor is None else kind

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() and self._kind() == lag.TRUE else 1

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if not self._is_cfg_enabled():
            return super().forward(pred_cond, None)
        # The regression runs where the calibration was fitted: on x̂₀ for a ComfyUI file, else on the raw output.
        sample = self.take_sample(WHERE) if on_denoised(self._calibration) and self._problem is None else None
        space = (lambda output: output) if sample is None else sample.denoised
        current = {"cond": space(pred_cond), "x": None if sample is None else sample.latents}
        if pred_uncond is not None:
            channels = self._calibration.coefficients.shape[2]
            if self._problem is None and pred_cond.shape[1] != channels:
                self._problem = f"the model output has {pred_cond.shape[1]} channels, calibrated {channels}"
                logger.warning(f"{WHERE}: {self._problem}; sampling with true CFG")
            self._anchor = {"index": self._step, "uncond": space(pred_uncond), **current}
            output = super().forward(pred_cond, pred_uncond)
        elif self._kind() == lag.REGRESSED:
            values = lag.term_tensors(self._calibration.terms, current, self._anchor, self._previous)
            regressed = lag.predict_uncond(self._calibration.coefficients[self._anchor["index"], self._step], values)
            output = super().forward(pred_cond, regressed if sample is None else sample.output(regressed))
        else:
            output = GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)
        self._previous = current
        return output


class CalibrationRecorder(ReadsNegative, FreshEachRun, ClassifierFreeGuidance):
    """Plain CFG that keeps the trajectory's predictions, timesteps and negative (``calibrate_linear_ag``)."""

    def start_run(self) -> None:
        self.conds, self.unconds, self.timesteps = [], [], []

    def observe_negative(self, fingerprint: torch.Tensor) -> None:
        self.negative_fingerprint = fingerprint

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        if pred_uncond is None:
            raise ValueError(f"{WHERE} calibration: every step needs true CFG (guidance_scale != 1, no start/stop)")
        self.conds.append(pred_cond.detach().float().cpu())
        self.unconds.append(pred_uncond.detach().float().cpu())
        self.timesteps.append(float(self._timestep))
        return super().forward(pred_cond, pred_uncond)


def calibrate_linear_ag(pipe, prompts: list[dict], path, *, num_inference_steps: int, guidance_scale: float,
                        terms=lag.TERMS, **call_kwargs) -> lag.Calibration:
    """Fit LinearAG's coefficients on full-CFG runs of a Modular pipeline and write them to ``path``.

    Args:
        pipe: a Modular pipeline with a ``guider`` component (restored afterwards).
        prompts (`list[dict]`): pipeline inputs per calibration run (e.g. ``prompt_embeds``,
            ``negative_prompt_embeds``, ... or ``prompt``); every run's negative must be the one you sample with
            (its fingerprint is stored; another negative at sampling time means true CFG, with a warning).
        path: where the calibration is written (atomically, safetensors).
        num_inference_steps, guidance_scale: the sampling settings the calibration is for.
        terms: the regression terms (``samplers.linear_ag.TERMS``; no latent terms).
        call_kwargs: further pipeline inputs for every run (``height``, ``width``, ``generator``, ...);
            ``output`` defaults to ``"latents"``.

    Returns:
        The ``Calibration`` written to ``path``.
    """
    terms = lag.validate_terms(terms)
    if any(term.endswith("x") for term in terms) or not prompts:
        raise ValueError(f"{WHERE} calibration: need at least one prompt and terms without latents, got "
                         f"{len(prompts)} prompts, terms {list(terms)}")
    recorder = CalibrationRecorder(guidance_scale=guidance_scale)
    previous = pipe.guider
    call_kwargs.setdefault("output", "latents")
    fit, negative = None, None
    pipe.update_components(guider=recorder)
    try:
        for inputs in prompts:
            pipe(**inputs, **call_kwargs, num_inference_steps=num_inference_steps)
            if negative is None:
                negative = recorder.negative_fingerprint
            elif not lag.fingerprints_match(recorder.negative_fingerprint, negative):
                raise ValueError(f"{WHERE} calibration: every run needs the same negative prompt (the one you sample "
                                 "with); run 1 and a later run differ")
            steps = len(recorder.conds)
            if fit is None:
                fit = lag.LeastSquaresFit(steps, recorder.conds[0].shape[1], terms)
            fit.add_trajectory([None] * steps, recorder.conds, recorder.unconds)
    finally:
        pipe.update_components(guider=previous)
    scheduler = pipe.scheduler
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    schedule = getattr(scheduler, "sigmas", None)
    schedule = torch.tensor(recorder.timesteps) if schedule is None else schedule.float().cpu()
    model = None if denoiser is None else fingerprint(denoiser.state_dict(), "diffusers")
    info = {"prediction_space": PREDICTION_SPACE, "pipeline": type(pipe).__name__,
            "scheduler": type(scheduler).__name__, "model": model,
            "steps": num_inference_steps, "cfg": guidance_scale, "timesteps": recorder.timesteps,
            "prompts": len(prompts), "images": len(prompts) * int(recorder.conds[0].shape[0]), "terms": list(terms)}
    calibration = lag.Calibration(fit.solve(), schedule[:fit.evaluations].clone(), schedule, negative, info)
    calibration.save(path)
    return calibration
