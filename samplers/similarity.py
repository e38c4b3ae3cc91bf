"""Similarity between predictions, per sample of a batch."""
import torch


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of each sample's flattened ``a`` and ``b``: [B, ...] x [B, ...] -> [B]."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)).float()
