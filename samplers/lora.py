"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on the Conv2d and Linear layers of a
network, with its normalisation parameters and biases, as PPAP's parameter-efficient experts use them.

A wrapped layer computes ``base(x) + (alpha / rank) · up(down(x))``: for a Linear, ``down`` is
Linear(in, rank) and ``up`` Linear(rank, out); for a Conv2d, ``down`` is a Conv2d(in, rank) with
the base layer's kernel, stride, padding and dilation and ``up`` a 1×1 Conv2d(rank, out) (the
peft convention).  ``down`` starts Kaiming-uniform and ``up`` at zero, so a fresh adapter leaves
the network unchanged.  The base weights stay frozen; the trainable set is the adapters plus every
normalisation layer's affine parameters and the biases of the adapted layers.

A small module of its own rather than ``peft``: the nodes load experts without a training-only
dependency, and an expert is just a state dict of the trainable names, applied to one shared
wrapped network by ``torch.func.functional_call`` (no copy of the base per expert).

``WeightDeltas`` is the other form, for a network that must not be touched (a ComfyUI MODEL): the
same update as a merged weight, ``W + (alpha / rank) · up @ down`` for each named Linear weight,
applied by ``functional_call`` while training and by a weight patch of the host at inference (the
formula of ComfyUI's own LoRA weight patch), so nothing is wrapped and nothing mutated.
"""
import math

import torch
from torch import nn

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)


class LoRALayer(nn.Module):
    """A frozen Conv2d or Linear plus a trainable rank-``rank`` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        self.down.to(base.weight)
        self.up.to(base.weight)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))


def add_lora(network: nn.Module, rank: int, alpha: float, exclude: tuple[str, ...] = (), seed: int = 0) -> list[str]:
    """Wrap every Conv2d / Linear of ``network`` (in place) whose qualified name does not start with
    an ``exclude`` prefix (adapters initialised from ``seed``, not the global RNG); freeze everything,
    then unfreeze adapters, norms and adapted biases.  Returns the trainable parameter names, sorted."""
    targets = [(name, module) for name, module in network.named_modules()
               if isinstance(module, (nn.Conv2d, nn.Linear)) and not name.startswith(tuple(exclude)) and name]
    if not targets:
        raise ValueError("add_lora: the network has no Conv2d or Linear layer to adapt")
    network.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        wrapped = LoRALayer(module, rank, alpha, generator)
        if module.bias is not None:
            module.bias.requires_grad_(True)
        setattr(parent, child, wrapped)
    for module in network.modules():
        if isinstance(module, NORM_TYPES):
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(True)
    return sorted(name for name, parameter in network.named_parameters() if parameter.requires_grad)


class WeightDeltas(nn.Module):
    """Low-rank updates of named Linear weights: ``delta(name) = (alpha / rank) · up @ down``.

    Args:
        shapes: ``{weight name: (out_features, in_features)}`` of the frozen weights to adapt.
        rank: the rank of every update.
        alpha: the scale numerator (``alpha / rank`` multiplies each update).
        seed: seed of the Kaiming-uniform ``down`` factors (``up`` starts at zero: no change at first).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int = 0):
        super().__init__()
        if rank < 1 or not shapes:
            raise ValueError(f"WeightDeltas: need rank >= 1 and at least one weight, got rank {rank}, {len(shapes)}")
        self.names, self.rank, self.alpha = sorted(shapes), rank, alpha
        generator = torch.Generator().manual_seed(seed)
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            out_features, in_features = shapes[name]
            down = torch.empty(rank, in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(out_features, rank)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def deltas(self) -> dict[str, torch.Tensor]:
        """``{weight name: (alpha / rank) · up @ down}`` (float32, differentiable)."""
        return {name: self.scale * (up.float() @ down.float())
                for name, up, down in zip(self.names, self.up, self.down)}

    def merged(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: weights[name] + delta(name)}`` for ``functional_call``, in each weight's dtype."""
        return {name: weights[name] + delta.to(weights[name].dtype) for name, delta in self.deltas().items()}

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{weight name: (up, down)}``, detached."""
        return {name: (up.detach(), down.detach()) for name, up, down in zip(self.names, self.up, self.down)}


def trainable_fraction(network: nn.Module) -> float:
    """Trainable parameters over all parameters (adapters included in both)."""
    total = sum(parameter.numel() for parameter in network.parameters())
    return sum(parameter.numel() for parameter in network.parameters() if parameter.requires_grad) / total


def with_parameters(network: nn.Module, parameters: dict[str, torch.Tensor], *args):
    """``network(*args)`` with the named parameters replaced (an expert), the rest as stored."""
    return torch.func.functional_call(network, parameters, args, strict=False)
