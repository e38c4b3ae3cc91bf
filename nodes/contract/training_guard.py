"""Guards of the training nodes (DeeDiff Train Heads, PPAP Train Experts, LinearAG Calibrate): memory estimated
and checked before any compute, work logged, ComfyUI's interrupt noticed in every phase.

Memory.  Each node lists what it will hold at its peak as ``Need`` s, each with the input that sets it:

* stored data, from shapes: PPAP's sampled pool and teacher logits, DeeDiff's recorded model inputs and exit
  features, LinearAG's trajectories of one prompt and its least-squares sums, each counting the copy a
  concatenation (or a solve) makes;
* one optimiser step, measured on a probe of the network being trained (``samplers.training.step_memory``:
  one and two synthetic rows of the real shapes, the bytes autograd saves per row times ``ACTIVATION_FACTOR`` 2,
  plus 16 bytes per trainable parameter for its value, gradient and AdamW state), times the batch rows, plus
  the batch's inputs.

DeeDiff's recording and LinearAG's trajectories grow with the model calls of a sampling run: before any compute
they are estimated at one call per step (the fewest any sampler makes), and checked again with the calls the
sampler really made after the first prompt's run, before the rest is stored (heun makes about two per step).
Not counted: the diffusion model, classifier and VAE themselves and the sampling of one latent batch, which costs
what any KSampler run of that latent costs (ComfyUI's model management plans it).

Measured on the toy world: the step estimate is above the real peak (PPAP student at 512 and 2048 rows: peak RSS
growth 1.1-1.3 MiB per row, estimate 1.4 MiB; DeeDiff heads at 512 rows: 0.6 MiB per row, estimate 0.8 MiB).

``check_memory`` compares the total with ``BUDGET_FRACTION`` (75%) of ``comfy.model_management.get_free_memory``:
on the CPU all needs against available RAM; with a GPU, the host needs against RAM and the device needs against
free GPU memory.  The remaining quarter is the margin for ComfyUI, the OS, other processes and the estimate's
own error.  Over budget is a ValueError ``"<node>: '<input>': ..."`` naming the input of the largest need.

Time is not refused: how long to train is the user's choice, every phase stops within about a second of
``/interrupt`` (``check_interrupt`` in sampling callbacks and between chunks, ``interrupt_requested`` as
``train``'s ``should_stop``, which checkpoints first), and ``log_work`` logs the work asked for at the start.
"""
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

import comfy.model_management

logger = logging.getLogger(__name__)
BUDGET_FRACTION = 0.75
SHOWN_NEEDS = 3  # the largest needs named in a message


@dataclass(frozen=True)
class Need:
    """``bytes`` held at the run's peak for ``what``, set by the node's input ``input``; ``on_device``: on the
    training device (else in host memory)."""

    input: str
    what: str
    bytes: int
    on_device: bool = False


def size(count: float) -> str:
    """Bytes as a short human figure (KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024


def tensor_bytes(shape: Iterable[int], dtype=torch.float32) -> int:
    count = 1
    for dimension in shape:
        count *= int(dimension)
    return count * torch.empty(0, dtype=dtype).element_size()


def check_memory(node: str, needs: list[Need], device) -> None:
    """ValueError naming ``node`` and the input of the largest need when ``needs`` exceed the budget of the
    memory they live in (module docstring); logs the estimate otherwise."""
    device = torch.device(device)
    pools = {"RAM": [need for need in needs if not need.on_device or device.type == "cpu"]}
    if device.type != "cpu":
        pools[str(device)] = [need for need in needs if need.on_device]
    for memory, held in pools.items():
        total = sum(need.bytes for need in held)
        free = comfy.model_management.get_free_memory(torch.device("cpu") if memory == "RAM" else device)
        budget = BUDGET_FRACTION * free
        ranked = sorted(held, key=lambda need: -need.bytes)
        parts = "; ".join(f"{need.what}: {size(need.bytes)}" for need in ranked[:SHOWN_NEEDS])
        parts += f"; {len(ranked) - SHOWN_NEEDS} smaller" if len(ranked) > SHOWN_NEEDS else ""
        if total > budget:
            largest = ranked[0]
            raise ValueError(f"{node}: '{largest.input}': this run would hold about {size(total)} in {memory} "
                             f"({parts}), more than {BUDGET_FRACTION:.0%} of the {size(free)} free; lower "
                             f"'{largest.input}'")
        if held:
            logger.info(f"{node}: estimated peak {size(total)} of {size(budget)} allowed in {memory} ({parts})")


def log_work(node: str, work: str) -> None:
    logger.info(f"{node}: {work}")


def check_interrupt(*_callback_arguments) -> None:
    """Raise ComfyUI's interrupt exception when ``/interrupt`` was posted (usable as a sampling callback)."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def interrupt_requested(_step: int | None = None) -> bool:
    """Whether ``/interrupt`` was posted (``train``'s ``should_stop``: it checkpoints and returns, then the node
    calls ``raise_interrupt``)."""
    return comfy.model_management.processing_interrupted()


def raise_interrupt() -> None:
    """End the node as ComfyUI's interrupt does (after a training run stopped on ``interrupt_requested``)."""
    comfy.model_management.interrupt_current_processing(False)
    raise comfy.model_management.InterruptProcessingException()
