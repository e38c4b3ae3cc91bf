"""Learned Adaptive Guidance: a calibrated per-sample policy for when to stop guiding.

Adaptive Guidance (Castillo et al., arXiv 2312.12487, Sec. 4) switches a sample from CFG to the
conditional alone once the cosine γ_t between its conditional and unconditional predictions
reaches a fixed γ̄.  Here the switch is decided by a small model fitted on the user's own model:

* **Label** (model-agnostic): for a calibration image, let I_k be the decoded image when CFG is
  used on the first k steps and the conditional alone after (k = steps is plain CFG).  With the
  distance d_k = mean |I_k − I_steps| over pixels (images in [0, 1]), the image's *earliest safe
  switch step* is the smallest L with d_k ≤ tolerance for every k ≥ L (``earliest_safe_step``;
  "every later k" because d_k is not monotone in k, so bisection would not give this label).
* **Features** at each evaluation, per sample, from what CFG already computes (no extra rows):
  ``FEATURES`` (``FeatureTracker``).  The prompt enters through the mean token embedding of the
  positive conditioning projected on the calibration prompts' principal directions.
* **Policy**: logistic regression p(safe | features), "safe" meaning the evaluation's step k
  satisfies k + 1 ≥ L (switching after this evaluation keeps the image within tolerance).  A
  sample keeps CFG at the evaluation where p ≥ ``threshold`` first holds and drops its
  unconditional at every later one (AG's ``SwitchState``, with p in place of γ).
"""
import math
from dataclasses import dataclass, field

import torch

from .adaptive_guidance import similarity
from .bundles import load_bundle, save_bundle

DYNAMIC_FEATURES = ("progress", "cosine", "cosine_change", "difference_norm", "difference_change",
                    "min_cosine", "max_difference_norm")
FORMAT = "guidance_kit.learned_ag/1"
TENSOR_KEYS = ("weights", "bias", "mean", "std", "prompt_mean", "prompt_basis")


def prompt_embedding(context: torch.Tensor) -> torch.Tensor:
    """The prompt as one vector: mean over tokens of a cross-attention context [B, T, D] -> [B, D]."""
    return context.float().mean(dim=1)


def project_prompts(embeddings: torch.Tensor, prompt_mean: torch.Tensor, prompt_basis: torch.Tensor) -> torch.Tensor:
    """Coordinates [B, P] of prompt embeddings [B, D] on the calibration's principal directions [P, D]."""
    return (embeddings.float() - prompt_mean) @ prompt_basis.T


def principal_directions(embeddings: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], the top ``count`` principal directions [count, D], scaled to unit variance) of [N, D]."""
    mean = embeddings.float().mean(0)
    centred = embeddings.float() - mean
    count = min(count, max(0, centred.shape[0] - 1), centred.shape[1])
    if count == 0:
        return mean, torch.zeros(0, embeddings.shape[1])
    _, singular, vectors = torch.linalg.svd(centred, full_matrices=False)
    scale = (singular[:count] / math.sqrt(max(1, centred.shape[0] - 1))).clamp_min(1e-6)
    return mean, vectors[:count] / scale[:, None]


class FeatureTracker:
    """Per-run, per-sample history of the online features (fresh for every sampling run).

    ``features(progress, cond, uncond, cfg_scale)`` for the samples evaluated with CFG returns
    [B, len(DYNAMIC_FEATURES)]: progress through the schedule (0 at the first evaluation, →1),
    AG's guidance cosine γ and its change since the sample's previous evaluation, the relative
    guidance-difference norm ‖D_c − D_u‖ / ‖D_c‖ and the relative norm of its change since the
    previous evaluation, the lowest γ and the largest difference norm so far."""

    def __init__(self):
        self.previous_difference = None
        self.previous_cosine = None
        self.min_cosine = None
        self.max_norm = None

    def features(self, progress: float, cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        cosine = similarity("guidance", cond, cond, uncond, cfg_scale=cfg_scale).double().cpu()
        difference = (cond - uncond).flatten(1).double().cpu()
        cond_norm = cond.flatten(1).double().norm(dim=1).cpu().clamp_min(1e-12)
        norm = difference.norm(dim=1) / cond_norm
        if self.previous_difference is None or self.previous_difference.shape != difference.shape:
            change, cosine_change = torch.zeros_like(norm), torch.zeros_like(norm)
            self.min_cosine, self.max_norm = cosine.clone(), norm.clone()
        else:
            change = (difference - self.previous_difference).norm(dim=1) / cond_norm
            cosine_change = cosine - self.previous_cosine
            self.min_cosine, self.max_norm = torch.minimum(self.min_cosine, cosine), torch.maximum(self.max_norm, norm)
        self.previous_difference, self.previous_cosine = difference, cosine
        columns = [torch.full_like(norm, progress), cosine, cosine_change, norm, change, self.min_cosine,
                   self.max_norm]
        return torch.stack(columns, dim=1).float()


def batch_cosine(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The guidance cosine of the whole batch as one vector (the batch-global rule of peer packs)."""
    return similarity("guidance", cond, cond.reshape(1, -1), uncond.reshape(1, -1), cfg_scale=cfg_scale)[0]


def earliest_safe_step(distances: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Per image, the smallest searched switch step L with distances[:, k] ≤ tolerance for every searched k ≥ L.

    ``distances`` [N, steps + 1]: column k is the image's distance to plain CFG when CFG stops after
    k steps (column ``steps`` is CFG itself, 0; a non-finite column was not searched and neither
    breaks nor gives a label).  Returns int64 [N] in 0..steps."""
    searched = torch.isfinite(distances)
    searched[:, -1] = True  # plain CFG itself
    within = (distances <= tolerance) | ~searched
    within[:, -1] = True
    # suffix-all: a step is safe when it and every later searched step are within tolerance
    safe_suffix = within.flip(1).int().cumprod(1).flip(1).bool() & searched
    return safe_suffix.int().argmax(dim=1)


def monotone_fraction(distances: torch.Tensor, tolerance: float) -> float:
    """Fraction of images whose "within tolerance" verdict, over the searched (finite) steps, never goes
    back from True to False as k grows (when it is 1, bisection on k gives the labels of the full search)."""
    searched = torch.isfinite(distances)
    within = (distances <= tolerance) & searched
    seen_within = within.int().cummax(dim=1).values.bool()
    broken = seen_within[:, :-1] & searched[:, 1:] & ~within[:, 1:]
    return float((~broken.any(dim=1)).float().mean())


def safe_targets(steps_of_evaluation: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1.0 where switching after this evaluation is safe: the evaluation's step k has k + 1 ≥ L."""
    return (steps_of_evaluation + 1 >= labels).float()


@dataclass
class Policy:
    """Logistic regression over standardised features; the prompt part projects the conditioning."""

    weights: torch.Tensor          # [F]
    bias: torch.Tensor             # [1]
    mean: torch.Tensor             # [F] feature standardisation
    std: torch.Tensor              # [F]
    prompt_mean: torch.Tensor      # [D]
    prompt_basis: torch.Tensor     # [P, D]
    info: dict = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return list(self.info.get("features", []))

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """p(safe) [N] for features [N, F] (the dynamic features, then the prompt coordinates)."""
        z = (features.float() - self.mean) / self.std
        return torch.sigmoid(z @ self.weights + self.bias)

    def save(self, path) -> None:
        save_bundle(path, {key: getattr(self, key).float() for key in TENSOR_KEYS}, self.info, FORMAT)

    @classmethod
    def load(cls, path, where: str = "Adaptive Guidance (learned)") -> "Policy":
        bundle = load_bundle(path, FORMAT, where, shapes=dict.fromkeys(TENSOR_KEYS))
        tensors = {key: value.float() for key, value in bundle.tensors.items()}
        features, basis = tensors["weights"].shape, tensors["prompt_basis"].shape
        consistent = (tensors["weights"].ndim == 1 and tensors["bias"].shape == (1,)
                      and tensors["mean"].shape == features and tensors["std"].shape == features
                      and len(basis) == 2 and tensors["prompt_mean"].shape == basis[1:]
                      and features[0] == len(DYNAMIC_FEATURES) + basis[0]
                      and len(bundle.metadata.get("features", [])) == features[0])
        if not consistent:
            shapes = {key: tuple(value.shape) for key, value in tensors.items()}
            raise ValueError(f"{where}: {path}: inconsistent shapes {shapes}")
        return cls(**tensors, info=bundle.metadata)

    def describe(self) -> str:
        i = self.info
        return (f"{i.get('model')} {i.get('sampler')}/{i.get('scheduler')} {i.get('steps')} steps, "
                f"cfg {i.get('cfg')}, tolerance {i.get('tolerance')}")


def fit_logistic(features: torch.Tensor, targets: torch.Tensor, *, l2: float = 1e-3,
                 iterations: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, bias, mean, std): L2-regularised logistic regression on standardised [N, F] features
    (L-BFGS in float64; ``l2`` on the weights, per example).  Runs with autograd on even inside ComfyUI's
    inference mode (nodes execute there)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = features.detach().double().clone()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        y = targets.detach().double().clone()
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

        def loss():
            optimiser.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.pow(2).sum()
            value.backward()
            return value

        optimiser.step(loss)
    return w.detach().float(), b.detach().float(), mean.float(), std.float()


def switch_steps(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per sample, the number of CFG steps when it switches after the first evaluation with p ≥ threshold:
    ``probabilities`` [N, steps] over the evaluations of a full-CFG trajectory -> int64 [N] in 1..steps
    (``steps`` when p never reaches the threshold)."""
    reached = probabilities >= threshold
    first = reached.int().argmax(dim=1)
    return torch.where(reached.any(dim=1), first + 1, torch.full_like(first, probabilities.shape[1]))
