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
