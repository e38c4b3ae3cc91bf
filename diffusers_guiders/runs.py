"""What every Guidance Kit guider shares: per-run state started afresh at step 0."""
import torch


class FreshEachRun:
    """Mixin for a ``BaseGuidance`` subclass: ``start_run()`` is called when the pipeline sets step 0, so
    no state survives from one pipeline call to the next (the guider object is a pipeline component)."""

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:
            self.start_run()

    def start_run(self) -> None:
        raise NotImplementedError


def in_window(guider) -> bool:
    """Whether a ``BaseGuidance`` guides at its current step: enabled, and the step inside [start, stop) of the
    steps (the rule of diffusers' own guiders; always inside before the pipeline has set a step)."""
    if not guider._enabled:
        return False
    steps = guider._num_inference_steps
    return steps is None or int(guider._start * steps) <= guider._step < int(guider._stop * steps)


def per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool [B] mask shaped to broadcast over ``like`` [B, ...]."""
    return mask.to(like.device).view(-1, *([1] * (like.ndim - 1)))
