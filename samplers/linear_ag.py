"""LinearAG: predict the unconditional from past estimates of the same trajectory.

Castillo et al., arXiv 2312.12487, Sec. 5: on regressed evaluations the unconditional is a linear
regression on past estimates of the same trajectory, fitted offline by least squares on full-CFG
trajectories.  The terms are not stated in the paper; the default ``TERMS``, for a regressed
evaluation j whose last true-CFG evaluation (the anchor) is a, is

    û_j = w₁·D_c(j) + w₂·D_c(a) + w₃·D_u(a)

on denoised predictions, with coefficients per (anchor, target) pair and per latent channel
(normal equations in float64, ridge 1e-9 of the mean diagonal).  ``step_pattern``: the first
``guided_until`` of the evaluations are guided (true CFG every ``true_every``-th, starting with the
first; regressed otherwise), the rest conditional only; the paper's schedule is (2, 0.5).
"""
import math
from dataclasses import dataclass, field

import torch

from .bundles import load_bundle, save_bundle

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

    def add_trajectory(self, xs: list, conds: list, unconds: list, on_target=None) -> None:
        """One full-CFG trajectory (a batch): per evaluation the latent x and the predictions D_c, D_u.
        ``on_target()`` is called before each target evaluation's regressions (e.g. to stop on an interrupt)."""
        if len(xs) != self.evaluations:
            raise ValueError(f"LinearAG calibration: trajectory has {len(xs)} evaluations, expected {self.evaluations}")
        for target in range(1, self.evaluations):
            if on_target is not None:
                on_target()
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


FINGERPRINT_SIZE = 4096


def conditioning_fingerprint(tensors) -> torch.Tensor:
    """Evenly strided sample (≤ ``FINGERPRINT_SIZE`` values) of conditioning tensors flattened in order (the
    negative's, stored in a calibration); empty for none."""
    if not tensors:
        return torch.zeros(0)
    flat = torch.cat([tensor.flatten().float().cpu() for tensor in tensors])
    return flat[::max(1, flat.numel() // FINGERPRINT_SIZE)][:FINGERPRINT_SIZE].contiguous()


def fingerprints_match(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values within 1% of the calibrated fingerprint's spread (an empty one matches any empty)."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return float((a - b).abs().max()) <= 1e-2 * float(b.std().clamp_min(1e-6))


FORMAT = "guidance_kit.linear_ag/1"
TENSOR_KEYS = ("coefficients", "evaluation_sigmas", "schedule", "negative_fingerprint")


@dataclass
class Calibration:
    """Fitted coefficients [E, E, C, K], the evaluation sigmas [E] and schedule [steps + 1] they were
    fitted on, a fingerprint of the negative's conditioning, and metadata (``info``)."""

    coefficients: torch.Tensor
    evaluation_sigmas: torch.Tensor
    schedule: torch.Tensor
    negative_fingerprint: torch.Tensor
    info: dict = field(default_factory=dict)

    @property
    def evaluations(self) -> int:
        return self.coefficients.shape[0]

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self.info["terms"])

    def save(self, path) -> None:
        save_bundle(path, {key: getattr(self, key).float() for key in TENSOR_KEYS}, self.info, FORMAT)

    @classmethod
    def load(cls, path, where: str = "LinearAG") -> "Calibration":
        bundle = load_bundle(path, FORMAT, where, shapes=dict.fromkeys(TENSOR_KEYS))
        tensors, info = bundle.tensors, bundle.metadata
        try:
            terms = validate_terms(info.get("terms", ()))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {path}: {error}") from None
        not_float = sorted(key for key, value in tensors.items() if not value.is_floating_point())
        if not_float:
            raise ValueError(f"{where}: {path}: {not_float} must be floating-point tensors")
        tensors = {key: value.float() for key, value in tensors.items()}
        c = tensors["coefficients"]
        consistent = c.ndim == 4 and c.shape[0] == c.shape[1] and c.shape[3] == len(terms) \
            and tensors["evaluation_sigmas"].shape == c.shape[:1] and tensors["schedule"].ndim == 1 \
            and tensors["negative_fingerprint"].ndim == 1
        if not consistent:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            raise ValueError(f"{where}: {path}: inconsistent shapes {shapes}")
        return cls(**tensors, info=info)

    def describe(self) -> str:
        i = self.info
        return (f"{i.get('model')} {i.get('sampler')}/{i.get('scheduler')} {i.get('steps')} steps, "
                f"cfg {i.get('cfg')}, negative {i.get('negative_prompt')!r}")
