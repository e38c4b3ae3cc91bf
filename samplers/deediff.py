"""DeeDiff: uncertainty-aware early exit through a diffusion transformer's blocks.

Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating Diffusion Model
Generation", arXiv 2309.17074 (ECCV 2024 as AdaDiff; code Tangshengku/AdaDiff).  Equation numbers
refer to arXiv v1, Sec. 3:

* Eq. 4, Uncertainty Estimation Module (UEM), one per exit i (block output h_i at timestep t):
  u_i = σ(W_i·[LN(h_i); SiLU(e_t)] + b_i), per image token and per output channel of a token
  (the output head's patch dimension), computed on the detached hidden state.  e_t is the
  model's own modulation vector (timestep embedding, plus the pooled text where the model has
  one), which makes the module timestep-aware.  ``hidden > 0`` inserts a GELU layer of that width
  (a capacity option; the paper's module is the linear one).
* Eq. 5, pseudo uncertainty: û_i = tanh(|g(h_i) − y|), with g the model's own output head shared by
  every exit and y the training target (detached).
* Eq. 6, uncertainty loss: L_u = Σ_i mean(u_i − û_i)²  (averaged over exits, as in the code).
* Eq. 7, uncertainty-aware layer-wise loss: L_UAL = Σ_i w_i·mean(g(h_i) − y)², the paper's
  (1 − u_i) weighting normalised over exits per sample as in the official code,
  w_i = (1 − ū_i) / Σ_j (1 − ū_j), with ū_i the mean uncertainty of exit i; the weights are
  detached so the UEM is trained by L_u alone.
* Exit rule (Sec. 3.4): after block i, a row leaves when its confidence 1 − mean(u_i) reaches the
  threshold.  Per row, not per batch: the official code averages over the batch (and so samples
  at batch 1); here every row of the model's batch, cond and uncond rows alike, decides alone.

* Joint training (Sec. 3.3, L = L_UAL + L_u, the backbone trained with the heads), here with the backbone
  frozen and low-rank adapters on its blocks' attention and MLP projections (``samplers.lora.WeightDeltas``)
  trained instead, plus a self-distillation term keeping the adapted full-depth output on the frozen
  model's: ``joint_loss`` = L_UAL + L_u + λ·mean(g(h_L) − y)² (λ: ``distill_weight``).

Where this module departs from the paper: y is the frozen model's own final prediction
(self-distillation) rather than the ground-truth noise, because the heads are trained for a
given, already-trained MODEL on samples it generated (data-free), and an exit is good exactly
when it reproduces that model's output.

The exit engine (``ForwardExits``, ``run_block``) works on ComfyUI's block-replacement argument
dicts (``{"img", "txt", "vec", "pe", "transformer_options"}``) but imports nothing from ComfyUI:
rows still running are gathered into a sub-batch for each block (so exited rows cost nothing),
exited rows keep their hidden state unchanged through the remaining blocks, and the model's own
output head then reads it.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "guidance_kit.deediff/1"  # heads only
JOINT_FORMAT = "guidance_kit.deediff/2"  # heads and the backbone's low-rank adapters


class UncertaintyHead(nn.Module):
    """One UEM (Eq. 4): image tokens [B, N, width] and modulation vector [B, vec_dim] -> u in (0, 1) [B, N, out_dim]."""

    def __init__(self, width: int, vec_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        inner = hidden or out_dim
        self.token = nn.Linear(width, inner)
        self.time = nn.Linear(vec_dim, inner)
        self.out = nn.Linear(hidden, out_dim) if hidden else None

    def forward(self, tokens: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        tokens, vec = tokens.detach().float(), vec.detach().float()
        z = self.token(F.layer_norm(tokens, tokens.shape[-1:])) + self.time(F.silu(vec))[:, None]
        if self.out is not None:
            z = self.out(F.gelu(z))
        return torch.sigmoid(z)


class UncertaintyHeads(nn.Module):
    """The UEMs of a model with ``blocks`` blocks: one after each block but the last (whose output is the model's)."""

    def __init__(self, blocks: int, width: int, vec_dim: int, out_dim: int, hidden: int = 0):
        super().__init__()
        if blocks < 2:
            raise ValueError(f"DeeDiff needs a model with at least 2 blocks, got {blocks}")
        self.config = {"blocks": blocks, "width": width, "vec_dim": vec_dim, "out_dim": out_dim, "hidden": hidden}
        self.heads = nn.ModuleList(UncertaintyHead(width, vec_dim, out_dim, hidden) for _ in range(blocks - 1))

    @property
    def exits(self) -> int:
        return len(self.heads)

    def forward(self, index: int, tokens: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.heads[index](tokens, vec)

    def shapes(self) -> dict[str, tuple]:
        """Expected tensor shapes of this configuration's state dict (for bundle checks)."""
        return {key: tuple(value.shape) for key, value in self.state_dict().items()}


def confidence(u: torch.Tensor) -> torch.Tensor:
    """Per-row confidence 1 − mean(u) over tokens and channels: [B, N, C] -> [B]."""
    return 1.0 - u.flatten(1).mean(dim=1)


def pseudo_uncertainty(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5: û = tanh(|g(h_i) − y|), detached."""
    return torch.tanh((prediction - target).abs()).detach()


def uncertainty_loss(uncertainties: list[torch.Tensor], pseudo: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 6: L_u = mean over exits of mean((u_i − û_i)²), with û_i from ``pseudo_uncertainty``."""
    return torch.stack([(u - target.to(u.dtype)).pow(2).mean() for u, target in zip(uncertainties, pseudo)]).mean()


def layerwise_loss(uncertainties: list[torch.Tensor], predictions: list[torch.Tensor],
                   target: torch.Tensor) -> torch.Tensor:
    """Eq. 7: L_UAL = mean over rows of Σ_i w_i·mean((g(h_i) − y)²), w_i = (1 − ū_i) / Σ_j (1 − ū_j) (detached)."""
    certainty = torch.stack([confidence(u) for u in uncertainties], dim=1).detach()  # [B, exits]
    weights = certainty / certainty.sum(dim=1, keepdim=True)
    errors = torch.stack([(p - target).pow(2).flatten(1).mean(dim=1) for p in predictions], dim=1)
    return (weights * errors).sum(dim=1).mean()


def joint_loss(uncertainties: list[torch.Tensor], predictions: list[torch.Tensor], target: torch.Tensor,
               distill_weight: float) -> torch.Tensor:
    """Joint training loss: L_UAL (Eq. 7) + L_u (Eq. 6) over the exits + ``distill_weight``·mean(g(h_L) − y)².

    Args:
        uncertainties: u_i of every exit (all blocks but the last), [B, N, C] each.
        predictions: g(h_i) of every block, the last being the adapted model's output, [B, N, C] each.
        target: y, the frozen model's output [B, N, C] (no gradient).
        distill_weight: λ, the weight of the self-distillation term on the full-depth output.
    """
    exits = predictions[:-1]
    pseudo = [pseudo_uncertainty(p, target) for p in exits]
    distill = (predictions[-1] - target).pow(2).mean()
    return layerwise_loss(uncertainties, exits, target) + uncertainty_loss(uncertainties, pseudo) + \
        distill_weight * distill


@dataclass
class ForwardExits:
    """Exit bookkeeping of one diffusion-model call over ``batch`` rows of ``image_tokens`` image tokens each."""

    batch: int
    image_tokens: int
    blocks: int
    device: torch.device | str = "cpu"
    active: torch.Tensor = field(init=False)
    blocks_run: torch.Tensor = field(init=False)
    block_rows: int = 0

    def __post_init__(self):
        self.active = torch.ones(self.batch, dtype=torch.bool, device=self.device)
        self.blocks_run = torch.full((self.batch,), self.blocks, dtype=torch.long)

    @property
    def full_block_rows(self) -> int:
        return self.batch * self.blocks


def select_rows(args: dict, rows: torch.Tensor, batch: int) -> dict:
    """A block-argument dict restricted to ``rows``: every tensor whose first dimension is the batch is indexed."""
    return {key: value[rows.to(value.device)] if isinstance(value, torch.Tensor) and value.ndim and
            value.shape[0] == batch else value for key, value in args.items()}


def merge_rows(args: dict, out: dict, rows: torch.Tensor) -> dict:
    """The block's full-batch output: ``args``' tensors with the sub-batch results ``out`` written at ``rows``."""
    merged = {}
    for key, value in out.items():
        before = args.get(key)
        if isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor) and before.shape[1:] == value.shape[1:]:
            full = before.clone()
            full[rows.to(full.device)] = value.to(full.dtype)
            merged[key] = full
        else:
            merged[key] = value
    return merged


def run_block(index: int, args: dict, call_block, heads: UncertaintyHeads, threshold: float,
              exits: ForwardExits) -> dict:
    """Block ``index`` on the rows still running; rows whose confidence after it reaches ``threshold`` exit.

    ``call_block(args) -> dict`` computes the block (or a chained replacement) on a sub-batch.
    Exited rows' entries pass through unchanged; when no row is running the block is not called."""
    rows = exits.active.nonzero().flatten()
    if rows.numel() == 0:
        return {key: value for key, value in args.items() if key in ("img", "txt")}
    whole = rows.numel() == exits.batch
    running = args if whole else select_rows(args, rows, exits.batch)
    out = call_block(running)
    exits.block_rows += rows.numel()
    if index < heads.exits:
        u = heads(index, out["img"][:, -exits.image_tokens:], running["vec"])
        leaving = rows[(confidence(u) >= threshold).to(rows.device)]
        exits.active[leaving] = False
        exits.blocks_run[leaving.cpu()] = index + 1
    return out if whole else merge_rows(args, out, rows)
