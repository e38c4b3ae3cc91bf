"""LinearAG: predict the unconditional from past estimates of the same trajectory.

Castillo et al., arXiv 2312.12487, Sec. 5 (LinearAG): the unconditional estimate of some steps is
replaced by a linear regression on past estimates of the same trajectory, fitted offline by least
squares on full-CFG trajectories; the reported schedule alternates true CFG and regressed CFG in
the first half and uses AG (conditional only) in the second half (25 NFEs instead of 40 at 20
steps).  The paper does not state the regression's terms; this module chooses:

* Space: the denoised predictions D(x; σ) ComfyUI's models return (with a latent term the fit is
  equally expressive in ε-space, ε being affine in x and D).
* Terms, for a regressed evaluation j whose most recent true-CFG evaluation (the *anchor*) is a,
  chosen among ``KNOWN_TERMS``; the default ``TERMS`` is

      û_j = w₁·D_c(j) + w₂·D_c(a) + w₃·D_u(a)

  the current conditional and the anchor's conditional and unconditional (with the paper's
  alternating pattern the anchor is the previous step).  Every input is a true model prediction:
  a regressed estimate never feeds another regression.  Latent terms (``x``, ``anchor_x``,
  ``previous_x``) fit held-out *full-CFG* trajectories far better, because the latent path
  encodes the CFG updates taken so far, but at use those updates were regressed ones: measured
  on the samples themselves they are no closer to CFG (bench/adaptive_guidance.py --terms), so
  the default leaves them out.
* Coefficients per (anchor a, target j) pair and per latent channel, fitted for every pair
  a < j, so the true/regressed pattern is chosen at apply time without recalibrating.  With a =
  j − 1 the regression contains "reuse the previous unconditional" and "reuse the previous
  guidance difference" as special cases.
* Fit: normal equations accumulated in float64 over all pixels of all calibration samples, solved
  with a tiny ridge (1e-9 of the mean diagonal) for numerical safety.

Pattern (``step_pattern``): the first ``guided_until`` fraction of the evaluations is guided,
true CFG on every ``true_every``-th of them (starting with the first) and regressed CFG on the
others; the rest are conditional only.  The paper's schedule is true_every = 2,
guided_until = 0.5.  Measured on the toy model (bench/adaptive_guidance.py, held-out error
relative to dropping guidance): the regression recovers most of the guidance difference one
evaluation after a true one (error ratio 0.32), little five after (0.90), so patterns with
sparse true evaluations are close to unguided between them.
"""
import math

import torch

KNOWN_TERMS = ("cond", "x", "anchor_cond", "anchor_uncond", "anchor_x", "previous_cond", "previous_x")
TERMS = ("cond", "anchor_cond", "anchor_uncond")
TRUE, REGRESSED, CONDITIONAL = "true", "regressed", "conditional"


def validate_terms(terms) -> tuple[str, ...]:
    unknown = [term for term in terms if term not in KNOWN_TERMS]
    if unknown or not terms or len(set(terms)) != len(terms):
        raise ValueError(f"LinearAG: terms must be distinct names from {KNOWN_TERMS}, got {list(terms)}")
    return tuple(terms)


def term_tensors(terms, current: dict, anchor: dict, previous: dict) -> list[torch.Tensor]:
    """The regression inputs named by ``terms``; each source is a dict with "x", "cond" (and the
    anchor's "uncond") tensors [B, C, ...]: "anchor_uncond" -> anchor["uncond"], "x" -> current["x"]."""
    sources = {"anchor": anchor, "previous": previous}
    values = []
    for term in terms:
        source, _, key = term.rpartition("_")
        values.append(sources[source][key] if source else current[key])
    return values


def _design(values: list[torch.Tensor]) -> torch.Tensor:
    """K tensors [B, C, ...] -> design matrix [C, B·N, K] (one regression per channel)."""
    stacked = torch.stack(values, dim=-1).double()
    return stacked.transpose(0, 1).reshape(stacked.shape[1], -1, len(values))


def predict_uncond(coefficients: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """û = Σ_k w[c, k]·values[k] per channel c; ``coefficients`` [C, K] for one (anchor, target) pair."""
    reference = values[0]
    w = coefficients.to(device=reference.device, dtype=reference.dtype)
    shape = (1, w.shape[0]) + (1,) * (reference.ndim - 2)
    return sum(w[:, k].view(shape) * value for k, value in enumerate(values))


def trajectory_terms(terms, xs, conds, unconds, anchor: int, target: int) -> list[torch.Tensor]:
    """``term_tensors`` for evaluation ``target`` of a recorded full-CFG trajectory, anchored at ``anchor``."""
    return term_tensors(terms, {"x": xs[target], "cond": conds[target]},
                        {"x": xs[anchor], "cond": conds[anchor], "uncond": unconds[anchor]},
                        {"x": xs[target - 1], "cond": conds[target - 1]})


class LeastSquaresFit:
    """Accumulates the normal equations of every (anchor, target) pair over calibration trajectories."""

    def __init__(self, evaluations: int, channels: int, terms=TERMS):
        self.terms = validate_terms(terms)
        self.evaluations = evaluations
        self.channels = channels
        k = len(self.terms)
        self.gram = torch.zeros(evaluations, evaluations, channels, k, k, dtype=torch.float64)
        self.moment = torch.zeros(evaluations, evaluations, channels, k, dtype=torch.float64)

    def add_trajectory(self, xs: list, conds: list, unconds: list) -> None:
        """One full-CFG trajectory (a batch): per evaluation the latent x and the predictions D_c, D_u."""
        if len(xs) != self.evaluations:
            raise ValueError(f"LinearAG calibration: trajectory has {len(xs)} evaluations, expected {self.evaluations}")
        for target in range(1, self.evaluations):
            response = unconds[target].double().transpose(0, 1).reshape(self.channels, -1, 1)
            for anchor in range(target):
                design = _design(trajectory_terms(self.terms, xs, conds, unconds, anchor, target))
                transposed = design.transpose(1, 2)
                self.gram[anchor, target] += (transposed @ design).cpu()
                self.moment[anchor, target] += (transposed @ response).squeeze(-1).cpu()

    def solve(self, ridge: float = 1e-9) -> torch.Tensor:
        """Coefficients [E, E, C, K] (float32); pairs with anchor >= target are zero."""
        k = len(self.terms)
        diagonal = self.gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        regularised = self.gram + ridge * diagonal[..., None, None] * torch.eye(k, dtype=torch.float64)
        upper = torch.ones(self.evaluations, self.evaluations, dtype=torch.bool).triu(1)
        coefficients = torch.zeros_like(self.moment)
        coefficients[upper] = torch.linalg.solve(regularised[upper], self.moment[upper].unsqueeze(-1)).squeeze(-1)
        return coefficients.float()


def step_pattern(evaluations: int, true_every: int, guided_until: float) -> list[str]:
    """Per evaluation: TRUE (2 rows), REGRESSED (1 row + regression) or CONDITIONAL (1 row)."""
    if true_every < 1:
        raise ValueError(f"LinearAG: true_every must be >= 1, got {true_every}")
    if not 0.0 <= guided_until <= 1.0:
        raise ValueError(f"LinearAG: guided_until must be in [0, 1], got {guided_until}")
    guided = math.ceil(evaluations * guided_until - 1e-9)
    return [CONDITIONAL if j >= guided else TRUE if j % true_every == 0 else REGRESSED for j in range(evaluations)]


def pattern_rows(pattern: list[str]) -> int:
    """Model rows per sample of a pattern (plain CFG: 2 per evaluation)."""
    return sum(2 if kind == TRUE else 1 for kind in pattern)


def heldout_errors(coefficients: torch.Tensor, terms, xs: list, conds: list, unconds: list,
                   distance: int = 1) -> dict:
    """Mean squared error of the unconditional estimate on one held-out full-CFG trajectory, every
    evaluation j ≥ distance predicted from the anchor a = j − distance, for: the fitted regression,
    reusing the anchor's unconditional ("previous_uncond"), reusing the anchor's guidance
    difference, D_c(j) − (D_c(a) − D_u(a)) ("previous_difference"), and no guidance, û = D_c(j)
    ("conditional": its error is the guidance difference itself, the scale the others compare to)."""
    totals = {"regression": 0.0, "previous_uncond": 0.0, "previous_difference": 0.0, "conditional": 0.0}
    targets = range(distance, len(xs))
    for j in targets:
        a = j - distance
        estimates = {
            "regression": predict_uncond(coefficients[a, j], trajectory_terms(terms, xs, conds, unconds, a, j)),
            "previous_uncond": unconds[a],
            "previous_difference": conds[j] - conds[a] + unconds[a],
            "conditional": conds[j],
        }
        for name, estimate in estimates.items():
            totals[name] += float((estimate - unconds[j]).double().pow(2).mean())
    return {name: total / len(targets) for name, total in totals.items()}
