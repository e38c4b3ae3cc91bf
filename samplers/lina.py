"""Causality-aware step schedule, after LINA (arXiv 2512.13290): a fixed step budget, a chosen share of it spent
before a boundary in the early, high-noise phase where layout and relations are decided.

A reconstruction (the paper's method section could not be read).  The base schedule ``s_0 > ... > s_N = 0`` is
read as a curve ``c(u)`` over the budget fraction ``u = i / N``: between budget points ``log c`` is linear in ``u``
(``c`` itself on the last segment, which ends at 0).  With ``u_b = c^-1(sigma_b)`` and ``k = round(share * N)``,
the new schedule is ``c(u_b * i / k)`` for ``i = 0..k`` then ``c(u_b + (1 - u_b) * j / (N - k))`` for
``j = 1..N-k``: each part spaced as the base spaces it, same first and last sigma.
"""
import math

import torch

from . import training


def _check_base(sigmas: torch.Tensor) -> torch.Tensor:
    """``sigmas`` as float64 after checking it is 1-D, strictly decreasing and ends at 0."""
    base = sigmas.detach().to("cpu", torch.float64).flatten()
    if base.numel() < 2 or float(base[-1]) != 0.0 or not bool((base[1:] < base[:-1]).all()):
        raise ValueError("the base schedule must be at least two strictly decreasing sigmas ending at 0, got "
                         f"{base.tolist()}")
    return base


def _curve(base: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """c(u): the base schedule at budget fractions ``u`` in [0, 1], log-linear between points, linear to 0."""
    steps = base.numel() - 1
    position = (fractions * steps).clamp(0, steps)
    index = position.floor().long().clamp(max=steps - 1)
    t = position - index
    high, low = base[index], base[index + 1]
    log_interp = torch.exp(torch.log(high) + t * (torch.log(low.clamp_min(1e-300)) - torch.log(high)))
    return torch.where(low > 0, log_interp, high * (1 - t))


def _inverse_curve(base: torch.Tensor, sigma: float) -> float:
    """u_b = c^-1(sigma) for sigma strictly between the base's first sigma and 0."""
    steps = base.numel() - 1
    index = int((base > sigma).sum()) - 1  # base[index] > sigma >= base[index + 1]
    high, low = float(base[index]), float(base[index + 1])
    t = math.log(high / sigma) / math.log(high / low) if low > 0 else 1 - sigma / high
    return (index + t) / steps


def boundary_fraction(sigmas: torch.Tensor, boundary_sigma: float) -> float:
    """The base schedule's own share of the budget before ``boundary_sigma``: u_b = c^-1(sigma_b)."""
    base = _check_base(sigmas)
    if not 0 < boundary_sigma < float(base[0]):
        raise ValueError(f"the boundary sigma {boundary_sigma} must lie strictly inside the schedule "
                         f"({float(base[0])}, 0)")
    return _inverse_curve(base, boundary_sigma)


def early_steps(steps: int, share: float) -> int:
    """k = round(share * N), clamped to [1, N - 1] so that both phases keep a step (N >= 2)."""
    return min(max(round(share * steps), 1), steps - 1)


def causality_aware_schedule(sigmas: torch.Tensor, share: float, boundary_sigma: float) -> torch.Tensor:
    """c(u_b * i / k), i = 0..k, then c(u_b + (1 - u_b) * j / (N - k)), j = 1..N - k (module docstring); a
    one-step schedule (N = 1) has no room for a boundary and comes back unchanged.  ``share`` in [0, 1]."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    base = _check_base(sigmas)
    steps = base.numel() - 1
    if steps == 1:
        return sigmas.clone()
    u_b = boundary_fraction(base, boundary_sigma)
    k = early_steps(steps, share)
    early = torch.linspace(0.0, u_b, k + 1, dtype=torch.float64)
    late = torch.linspace(u_b, 1.0, steps - k + 1, dtype=torch.float64)[1:]
    schedule = _curve(base, torch.cat([early, late]))
    schedule[0], schedule[-1] = base[0], 0.0
    return schedule.to(sigmas.dtype)


# ---------------------------------------------------------------- targeted guidance (after LINA)

PARAMETERS = ("share", "prompt_strength", "latent_strength", "window")
PARAMETER_RANGES = {"share": (0.0, 1.0), "prompt_strength": (0.0, 4.0), "latent_strength": (0.0, 4.0),
                    "window": (0.0, 1.0)}


def relation_mask(cond: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """M = m / max(m) per sample, m = mean over channels of |D(c) - D(c_abl)|: where the relation part of the
    prompt changes the prediction (shape [B, 1, *spatial], in [0, 1]; all zero where nothing changes)."""
    change = (cond - ablated).abs().mean(dim=1, keepdim=True)
    peak = change.flatten(1).amax(dim=1).view(-1, *([1] * (change.ndim - 1)))
    return torch.where(peak > 0, change / peak.clamp_min(1e-12), torch.zeros_like(change))


def targeted_guidance(cond: torch.Tensor, uncond: torch.Tensor, ablated: torch.Tensor, cfg: float,
                      prompt_strength: torch.Tensor, latent_strength: torch.Tensor) -> tuple:
    """The (cond, uncond) pair whose CFG combine ``u + cfg (c' - u)`` is, after LINA (arXiv 2512.13290, a
    reconstruction: the method section could not be read),

        D = u + cfg (c - u) + s_p (c - a) + s_l M * (c - u)

    with ``a`` the prediction under the relation-ablated prompt (``relation_mask``'s M), ``s_p`` the prompt
    strength and ``s_l`` the latent (region-restricted) strength, per sample ([B] tensors).  At cfg 0 the
    combine ignores ``c'`` and only ``u`` is returned.

    Args:
        cond, uncond, ablated: predictions [B, C, ...] under the prompt, the negative and the ablated prompt.
        cfg: the sampler's guidance scale.
        prompt_strength, latent_strength: per-sample strengths [B].
    """
    shape = (-1,) + (1,) * (cond.ndim - 1)
    extra = prompt_strength.view(shape).to(cond) * (cond - ablated)
    extra = extra + latent_strength.view(shape).to(cond) * relation_mask(cond, ablated) * (cond - uncond)
    if cfg == 0:
        return cond, uncond
    return cond + extra / cfg, uncond


# ---------------------------------------------------------------- the learned part

def conditioning_features(cross_attn: torch.Tensor) -> torch.Tensor:
    """A prompt's feature for the predictor: the mean over tokens of its conditioning [B, T, D] -> [B, D]."""
    return cross_attn.float().mean(dim=1)


class InterventionPredictor(torch.nn.Module):
    """A small MLP from a prompt's conditioning feature (``conditioning_features``, width ``width``) to the
    intervention parameters ``PARAMETERS``, each a sigmoid scaled to ``PARAMETER_RANGES``.

    Args:
        width: the text encoder's conditioning width D.
        hidden: hidden units.
    """

    def __init__(self, width: int, hidden: int = 32):
        super().__init__()
        self.width, self.hidden = width, hidden
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, len(PARAMETERS)))

    def unit(self, features: torch.Tensor) -> torch.Tensor:
        """Parameters in [0, 1] (before scaling to their ranges) [B, len(PARAMETERS)]."""
        return torch.sigmoid(self.net(features))

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return scale_parameters(self.unit(features))


def scale_parameters(unit: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, len(PARAMETERS)] in [0, 1] -> each parameter [B] in its range."""
    return {name: low + (high - low) * unit[:, i]
            for i, (name, (low, high)) in enumerate((n, PARAMETER_RANGES[n]) for n in PARAMETERS)}


def unit_parameters(parameters: dict) -> torch.Tensor:
    """The inverse of ``scale_parameters`` for one setting (a dict of floats) -> [len(PARAMETERS)]."""
    return torch.tensor([(parameters[n] - PARAMETER_RANGES[n][0]) / (PARAMETER_RANGES[n][1] - PARAMETER_RANGES[n][0])
                         for n in PARAMETERS], dtype=torch.float32)


def best_setting(scores: dict[str, list[float]]) -> str:
    """The setting with the highest mean score (ties to the first listed): the per-prompt search's target."""
    return max(scores, key=lambda name: sum(scores[name]) / len(scores[name]))


PREDICTOR_FORMAT = "guidance_kit.lina_predictor/1"


def predictor_identity(width: int, hidden: int, model: str) -> dict:
    """What a predictor file must match: its text encoder width, its size and the model it was searched on."""
    return {"architecture": "lina_predictor_mlp", "width": width, "hidden": hidden, "model": model,
            "parameters": list(PARAMETERS)}


def fit_predictor(features: torch.Tensor, targets: torch.Tensor, settings: "training.TrainSettings", *,
                  model: str, hidden: int = 32, checkpoint=None, on_step=None, should_stop=None, context=None):
    """Train an ``InterventionPredictor`` to map ``features`` [N, D] to the searched targets [N, P] (parameters in
    [0, 1], ``unit_parameters``) by mean squared error, through ``samplers/training.py`` (resumable, torchrun).
    Each step's batch: ``settings.batch_size`` prompts drawn with replacement from the step's generator.

    Returns (predictor, identity, result)."""
    with training.grad_mode():
        torch.manual_seed(settings.seed)
        predictor = InterventionPredictor(features.shape[1], hidden)
    identity = predictor_identity(features.shape[1], hidden, model)

    def loss_fn(step, rows):
        picks = torch.randint(0, features.shape[0], (settings.batch_size,),
                              generator=training.step_generator(settings.seed, step))[rows]
        return torch.nn.functional.mse_loss(predictor.unit(features[picks]), targets[picks])

    result = training.train({"predictor": predictor}, loss_fn, settings, context, identity=identity,
                            checkpoint=checkpoint, on_step=on_step, should_stop=should_stop)
    return predictor, identity, result
