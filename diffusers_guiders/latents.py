"""The latent and noise level of each step, handed to the guider by a loop block of a Modular denoise loop.

A diffusers guider is handed the conditioning and the model's raw predictions only.  Techniques that work on
the clean estimate x̂₀ (GFCG's classifier reading, LinearAG calibrations written by the ComfyUI nodes) also
need the step's latent x and noise level σ: ``show_latents(blocks)`` inserts ``ShowLatentsToGuider`` before
the denoiser step of every denoise loop of a Modular pipeline's blocks; it calls the guider's
``observe_sample(StepSample)`` (guiders without it are untouched).
"""
from dataclasses import dataclass

import torch
from diffusers.modular_pipelines import LoopSequentialPipelineBlocks, ModularPipelineBlocks
from diffusers.modular_pipelines.modular_pipeline_utils import InputParam

BLOCK_NAME = "show_latents_to_guider"
# denoised = a·x + b·output per prediction type (σ-parameterised latents, as diffusers' Euler schedulers and
# ComfyUI's EPS / V_PREDICTION / CONST model sampling with σ_data 1).
PREDICTIONS = {
    "epsilon": lambda sigma: (1.0, -sigma),
    "v_prediction": lambda sigma: (1.0 / (sigma ** 2 + 1.0), -sigma / (sigma ** 2 + 1.0) ** 0.5),
    "flow": lambda sigma: (1.0, -sigma),
}
# The forward process x = α·x0 + σ_t·n of those latents, (α, σ_t) per prediction type.
FORWARD_PROCESS = {
    "epsilon": lambda sigma: (1.0, sigma),
    "v_prediction": lambda sigma: (1.0, sigma),
    "flow": lambda sigma: (1.0 - sigma, sigma),
}


@dataclass
class StepSample:
    """One step's latent ``latents`` [B, C, ...], noise level ``sigma`` and the model's ``prediction`` type
    (a key of ``PREDICTIONS``); converts the model's raw output to the clean estimate x̂₀ and back."""

    latents: torch.Tensor
    sigma: float
    prediction: str

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"StepSample: prediction must be one of {list(PREDICTIONS)}, got {self.prediction!r}")

    def _coefficients(self) -> tuple[float, float]:
        return PREDICTIONS[self.prediction](float(self.sigma))

    def denoised(self, output: torch.Tensor) -> torch.Tensor:
        """x̂₀ = a·x + b·output."""
        a, b = self._coefficients()
        return a * self.latents.to(output.dtype) + b * output

    def forward_process(self) -> tuple[float, float]:
        """(α, σ_t) of the latents' forward process x = α·x0 + σ_t·n at this step."""
        return FORWARD_PROCESS[self.prediction](float(self.sigma))

    def output(self, denoised: torch.Tensor) -> torch.Tensor:
        """The raw output whose clean estimate is ``denoised`` (σ > 0)."""
        a, b = self._coefficients()
        return (denoised - a * self.latents.to(denoised.dtype)) / b


def prediction_type(scheduler) -> str:
    """``"flow"`` for flow-matching schedulers, else the scheduler's ``prediction_type``."""
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    return scheduler.config.get("prediction_type", "epsilon")


def sigma_at(scheduler, timestep) -> float:
    """σ of the step at ``timestep`` (the scheduler's current step index once it has one)."""
    index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(timestep)
    return float(scheduler.sigmas[index])


class ShowLatentsToGuider(ModularPipelineBlocks):
    """Denoise-loop step: hands the guider the step's latent and σ (``guider.observe_sample``)."""

    @property
    def description(self) -> str:
        return ("Step within the denoising loop that hands the guider the step's latents and noise level sigma "
                "(guider.observe_sample), for guiders that work on the clean estimate (Guidance Kit).")

    @property
    def inputs(self) -> list[InputParam]:
        return [InputParam("latents", required=True, type_hint=torch.Tensor, description="The current latents.")]

    @torch.no_grad()
    def __call__(self, components, block_state, i: int, t):
        observe = getattr(components.guider, "observe_sample", None)
        if observe is not None:
            scheduler = components.scheduler
            observe(StepSample(block_state.latents, sigma_at(scheduler, t), prediction_type(scheduler)))
        return components, block_state


def show_latents(blocks):
    """Insert ``ShowLatentsToGuider`` before the ``denoiser`` step of every denoise loop in ``blocks`` (in place;
    returns ``blocks``).  Raises when there is no such loop."""
    loops = []

    def visit(block):
        sub_blocks = getattr(block, "sub_blocks", None) or {}
        if isinstance(block, LoopSequentialPipelineBlocks) and "denoiser" in sub_blocks:
            loops.append(block)
        for sub_block in sub_blocks.values():
            visit(sub_block)

    visit(blocks)
    if not loops:
        raise ValueError(f"show_latents: {type(blocks).__name__} has no denoise loop with a 'denoiser' step")
    for loop in loops:
        if BLOCK_NAME not in loop.sub_blocks:
            loop.sub_blocks.insert(BLOCK_NAME, ShowLatentsToGuider(), list(loop.sub_blocks).index("denoiser"))
    return blocks


class SeesLatents:
    """Mixin for a ``BaseGuidance`` subclass that needs each step's ``StepSample`` (``show_latents``)."""

    _sample: StepSample | None = None

    def observe_sample(self, sample: StepSample) -> None:
        self._sample = sample

    def take_sample(self, where: str) -> StepSample:
        """This step's sample (each is used for one step only); a clear error when the pipeline shows none."""
        sample, self._sample = self._sample, None
        if sample is None:
            raise ValueError(f"{where}: needs each step's latents and sigma, which this pipeline does not hand the "
                             "guider: build it from show_latents(blocks) (guidance_kit.diffusers_guiders), e.g. "
                             "show_latents(StableDiffusionXLAutoBlocks()).init_pipeline(repo)")
        return sample
