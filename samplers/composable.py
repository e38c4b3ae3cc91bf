"""Composable Diffusion: AND / NOT of weighted concepts (Liu et al., arXiv 2206.01714, Sec. 4.1 Eq. 9-10).

    eps_hat = eps(x_t) + sum_i w_i * (eps(x_t | c_i) - eps(x_t))     (NOT: a negative w_i)

Linear in the predictions, so it holds unchanged on ComfyUI's denoised predictions for eps-, v- and
flow-prediction models (``compose``).  Adaptive Guidance per concept (arXiv 2312.12487, Sec. 4): a
concept whose denoised prediction reaches cosine ``threshold`` with the unconditional's stops being
evaluated (AG's ``SwitchState``, one per concept: per sample, keyed to the noise level); a sample
whose concepts have all converged continues on its lead concept (highest positive weight) alone.
"""
import math
from dataclasses import dataclass

import torch

from .adaptive_guidance import SwitchState
from .similarity import per_sample_cosine


def compose(uncond: torch.Tensor, concepts: list[torch.Tensor], weights: list) -> torch.Tensor:
    """``uncond + sum_i weights[i] * (concepts[i] - uncond)``; a weight is a number or a per-sample
    tensor [B].  A single concept of weight exactly 1 is returned as is (``u + 1*(c - u) = c``)."""
    if not concepts:
        raise ValueError("compose: no concepts")
    if len(concepts) != len(weights):
        raise ValueError(f"compose: {len(concepts)} concepts but {len(weights)} weights")
    if len(concepts) == 1 and _is_one(weights[0]):
        return concepts[0]
    total = None
    for concept, weight in zip(concepts, weights):
        term = (concept - uncond) * _per_sample(weight, uncond)
        total = term if total is None else total + term
    return uncond + total


def localise(concept: torch.Tensor, uncond: torch.Tensor, coverage: torch.Tensor | None) -> torch.Tensor:
    """A concept that applies to part of the image (area, mask, timestep range) predicts the
    unconditional where it does not apply: ``uncond + coverage * (concept - uncond)``."""
    return concept if coverage is None else uncond + coverage * (concept - uncond)


def check_weights(weights: list[float], where: str) -> None:
    """Raise a clear error for a composition that cannot guide anything."""
    if not weights:
        raise ValueError(f"{where}: the composition has no concepts")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{where}: concept weights must be finite numbers, got {weights}")
    if all(w == 0 for w in weights):
        raise ValueError(f"{where}: every concept weight is 0, so there is nothing to compose")


def lead_concept(weights: list[float], eligible: list[bool]) -> int | None:
    """The concept a fully converged sample continues on: the highest positive weight among the
    eligible ones (first on ties), or None (continue on the unconditional)."""
    candidates = [k for k, (w, ok) in enumerate(zip(weights, eligible)) if ok and w > 0]
    return max(candidates, key=lambda k: weights[k]) if candidates else None


class ConvergenceTracker:
    """Per-run, per-sample memory of which concepts have converged to the unconditional: Adaptive
    Guidance's own switch record (``adaptive_guidance.SwitchState``), one per concept.

    ``threshold`` is AG's gamma-bar in (0, 1]; 1 never skips."""

    def __init__(self, threshold: float):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"Composable: convergence threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.states: list[SwitchState] = []

    @property
    def enabled(self) -> bool:
        return self.threshold < 1.0

    def guiding(self, sigma: float, concepts: int, batch: int) -> torch.Tensor:
        """[concepts, batch] bool: concept k still guides sample b at noise level ``sigma``."""
        if len(self.states) != concepts:
            self.states = [SwitchState(self.threshold) for _ in range(concepts)]
        return torch.stack([~state.skipped(sigma, batch) for state in self.states])

    def observe(self, sigma: float, cosine: torch.Tensor, measured: torch.Tensor) -> list[int]:
        """Record [concepts, batch] cosines where ``measured``; returns the concepts that have now
        converged for every sample."""
        converged = []
        for k, state in enumerate(self.states):
            before = bool(torch.isfinite(state.switch_sigma).all())
            state.observe(sigma, cosine[k].nan_to_num(0.0), measured[k].cpu())
            if not before and torch.isfinite(state.switch_sigma).all():
                converged.append(k)
        return converged


def concept_cosine(concept: torch.Tensor, uncond: torch.Tensor, coverage: torch.Tensor | None) -> torch.Tensor:
    """[B] cosine between a concept's and the unconditional's prediction, over where the concept
    applies (weighted by its coverage)."""
    if coverage is None:
        return per_sample_cosine(concept, uncond)
    return per_sample_cosine(concept * coverage, uncond * coverage)


@dataclass
class StepPlan:
    """Which rows one evaluation needs.

    ``guiding[k, b]``: concept k's term applies to sample b; ``alone[b]``: every concept of sample
    b has converged, so it continues on the lead concept (or the unconditional) alone."""

    guiding: torch.Tensor
    alone: torch.Tensor
    lead: int | None
    concept_rows: list[bool]
    uncond_row: bool


def plan_step(guiding: torch.Tensor, lead: int | None) -> StepPlan:
    alone = ~guiding.any(0)
    concept_rows = guiding.any(1).tolist()
    any_alone = bool(alone.any())
    if lead is not None and any_alone:
        concept_rows[lead] = True
    uncond_row = bool(guiding.any()) or (lead is None and any_alone)
    return StepPlan(guiding, alone, lead, concept_rows, uncond_row)


def combine_step(plan: StepPlan, uncond: torch.Tensor | None, concepts: list, weights: list[float]):
    """(guided, base) for one evaluation, such that ``base + s * (guided - base)`` is the composed
    prediction at guidance scale s (ComfyUI's CFG formula):

    * a guiding sample: guided = compose(uncond, its guiding concepts, weights), base = uncond;
    * an ``alone`` sample: guided = base = the lead concept's (or the unconditional's) prediction,
      so the scale has no effect, as AG's conditional-only steps use scale 1.

    ``concepts[k]`` may be None where ``plan.concept_rows[k]`` is False."""
    alone_source = concepts[plan.lead] if plan.lead is not None else uncond
    if not plan.guiding.any():
        return alone_source, alone_source
    rows = [k for k, needed in enumerate(plan.concept_rows) if needed and plan.guiding[k].any()]
    if plan.guiding[rows].all():
        guided = compose(uncond, [concepts[k] for k in rows], [weights[k] for k in rows])
    else:
        per_sample = [weights[k] * plan.guiding[k].to(uncond) for k in rows]
        guided = compose(uncond, [concepts[k] for k in rows], per_sample)
    if not plan.alone.any():
        return guided, uncond
    alone = plan.alone.to(uncond.device).view(-1, *([1] * (uncond.ndim - 1)))
    return torch.where(alone, alone_source, guided), torch.where(alone, alone_source, uncond)


def _per_sample(weight, like: torch.Tensor):
    if isinstance(weight, torch.Tensor):
        return weight.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return weight


def _is_one(weight) -> bool:
    if isinstance(weight, torch.Tensor):
        return bool((weight == 1).all())
    return weight == 1
