"""A ``diffusers.hooks`` hook that evaluates a denoiser on some rows of its batch only (Adaptive Guidance's
per-sample unconditional pass)."""
import torch
from diffusers.hooks import HookRegistry, ModelHook

ROWS_HOOK = "guidance_kit_evaluate_rows"


def select_rows(value, rows: torch.Tensor, batch: int):
    """``value`` restricted to ``rows``: every tensor whose first dimension is the batch, inside dicts, lists and
    tuples too; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: select_rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(select_rows(item, rows, batch) for item in value)
    return value


def scatter_rows(sub_batch: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """A [batch, ...] tensor holding ``sub_batch`` at ``rows`` and zeros elsewhere."""
    full = sub_batch.new_zeros((batch, *sub_batch.shape[1:]))
    full[rows.to(full.device)] = sub_batch
    return full


class EvaluateRows(ModelHook):
    """Runs the module on the rows ``rows`` (a bool [B]) of its batch (the first positional argument's first
    dimension) and returns a full-batch prediction, zeros in the rows not evaluated (the first tensor of a
    tuple output, or an output's ``sample``)."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows.nonzero().flatten()
        self.batch = rows.shape[0]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if args[0].shape[0] != self.batch:
            raise ValueError(f"per-sample rows: the denoiser's batch is {args[0].shape[0]}, the guider's {self.batch}")
        out = self.fn_ref.original_forward(*select_rows(args, self.rows, self.batch),
                                           **select_rows(kwargs, self.rows, self.batch))
        if isinstance(out, tuple):
            return (scatter_rows(out[0], self.rows, self.batch), *out[1:])
        out.sample = scatter_rows(out.sample, self.rows, self.batch)
        return out


def evaluate_rows(denoiser: torch.nn.Module, rows: torch.Tensor) -> None:
    """Register ``EvaluateRows`` on ``denoiser`` (``release_rows`` removes it)."""
    HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(EvaluateRows(rows), ROWS_HOOK)


def release_rows(denoiser: torch.nn.Module) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    if registry.get_hook(ROWS_HOOK) is not None:
        registry.remove_hook(ROWS_HOOK, recurse=False)
