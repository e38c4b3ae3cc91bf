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


def per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool [B] mask shaped to broadcast over ``like`` [B, ...]."""
    return mask.to(like.device).view(-1, *([1] * (like.ndim - 1)))
