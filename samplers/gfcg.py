"""Gradient-free classifier guidance (GFCG; "Gradient-Free Classifier Guidance for Diffusion Model
Sampling", arXiv 2411.15393): a classifier, in inference only, reads each sample's clean estimate
and picks a *reference class* and a *scale*; guidance pushes from the reference's conditional
prediction towards the target's.

The paper's exact rules could not be read; these are the choices (README "GFCG", measured by
``bench/gfcg.py``).  Per sample and per classifier head h with target class t_h and probabilities
p_h = softmax(f_h(x̂_0)):

* reference class  r_h = argmax_{k ≠ t_h} p_{h,k}  (the class the sample is drifting towards);
* confusion        ρ_h = p_{h,r_h} / (p_{h,r_h} + p_{h,t_h})  (0: sure of the target, ½: tied,
  → 1: sure of the reference), computed on the two classes only so that mass on unrelated classes
  does not dilute it;
* scale            w_h = w_max · ρ_h, and w_h = 0 once p_{h,t_h} ≥ ``confidence`` (a confident sample
  gets no extra guidance and, for per-sample rows, costs no reference row).

One reference row per sample: the head with the largest w (the most confused attribute); its
reference conditioning is the prompt with that head's target phrase replaced by the reference
class phrase.  The guided prediction is

    D = D_base + w · (D(x; c) − D(x; c_ref))

where D_base is what the guider would output without GFCG (CFG: D(∅) + s·(D(c) − D(∅));
Autoguidance: D_weak(c) + w_ag·(D(c) − D_weak(c))).  With ``reference_row="guide"`` the reference
row takes the place of the guide row instead (no extra row): D = D_g' + s·(D(c) − D_g') with D_g'
the unconditional (CFG) or weak-model (Autoguidance) prediction under c_ref for a sample with
w > 0, its usual guide row otherwise.
"""
from dataclasses import dataclass

import torch

REFERENCE_ROWS = ("extra", "guide")


@dataclass
class Reference:
    """Per-sample decisions of one classifier reading: ``head`` and ``index`` of the reference class
    (LongTensors [B]), the GFCG ``scale`` w [B] (0 = no reference row) and ``target_probability``
    {head: [B]} (the classifier's p of each head's target)."""

    head: torch.Tensor
    index: torch.Tensor
    scale: torch.Tensor
    target_probability: dict[str, torch.Tensor]

    @property
    def active(self) -> torch.Tensor:
        """Boolean [B]: samples that get a reference row."""
        return self.scale > 0


def head_confusion(probabilities: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference class r = argmax_{k≠target} p_k, confusion ρ = p_r / (p_r + p_target)) per row of
    ``probabilities`` [B, K]."""
    others = probabilities.clone()
    others[:, target] = -1.0
    reference = others.argmax(dim=-1)
    p_reference = probabilities.gather(1, reference[:, None])[:, 0]
    p_target = probabilities[:, target]
    return reference, p_reference / (p_reference + p_target).clamp_min(1e-12)


def choose_reference(probabilities: dict[str, torch.Tensor], targets: dict[str, int], max_scale: float,
                     confidence: float) -> Reference:
    """The reference (head, class) and scale per sample from per-head ``probabilities`` {head: [B, K]}
    and ``targets`` {head: target class index} (module docstring: w_h = w_max·ρ_h, 0 when p_t ≥ confidence)."""
    heads = list(targets)
    references, scales = [], []
    for head in heads:
        reference, confusion = head_confusion(probabilities[head], targets[head])
        confident = probabilities[head][:, targets[head]] >= confidence
        references.append(reference)
        scales.append(torch.where(confident, torch.zeros_like(confusion), max_scale * confusion))
    scales = torch.stack(scales, dim=1)
    scale, head = scales.max(dim=1)
    index = torch.stack(references, dim=1).gather(1, head[:, None])[:, 0]
    return Reference(head, index, scale, {h: probabilities[h][:, targets[h]] for h in heads})


def guide(base: torch.Tensor, positive: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """D = D_base + w·(D(c) − D(c_ref)) with a per-sample scale w [B] (rows with w = 0 keep D_base)."""
    weight = scale.to(base.dtype).view(-1, *([1] * (base.ndim - 1)))
    return base + weight * (positive - reference)


@dataclass
class ReadingSchedule:
    """Classify every ``every`` evaluations of a run; in between the last reading is reused."""

    every: int = 1
    evaluations: int = 0
    last: Reference | None = None

    def due(self) -> bool:
        """Whether this evaluation reads the classifier (advances the evaluation count)."""
        due = self.last is None or self.evaluations % self.every == 0
        self.evaluations += 1
        return due
