"""The shared training core: one process or many, AdamW, resumable checkpoints, final bundles (pure torch).

* ``DistributedContext.from_environment()``: one process on ``cuda:LOCAL_RANK`` (or the CPU) by default; when
  ``torchrun`` or ``accelerate launch`` set ``WORLD_SIZE`` > 1 (with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``) it joins that process group (gloo on the CPU, nccl on CUDA).  ``rank``, ``world_size``,
  ``device``, ``is_main``, ``rows(batch_size)``, ``all_mean``, ``average_gradients``, ``broadcast_flag``,
  ``barrier``, ``close`` (also a context manager).
* ``train(trainables, loss_fn, settings, context, identity=..., checkpoint=...)``: AdamW over the trainable
  parameters of a dict of named modules/parameters, an optional warm-up and cosine schedule, gradient clipping,
  ``on_step(step, total, loss)`` on the main rank, ``should_stop(step)`` (decided by the main rank, broadcast),
  a checkpoint every ``checkpoint_every`` steps, on a stop and at the end.
* Determinism across world sizes: the global batch of step ``s`` (``settings.batch_size`` rows) is drawn from
  ``step_generator(settings.seed, s)``; each rank calls ``loss_fn(s, rows)`` with its contiguous slice of it and
  returns the mean loss over those rows (draw the whole batch and index ``rows``, or draw row ``i`` alone from
  ``step_generator(seed, s, i)``); gradients and losses are then averaged over the ranks, which is the gradient of
  the whole batch's mean, so N processes follow the one-process run up to float summation order.
  Initial parameters are broadcast from rank 0; torch's global RNG is reseeded from (seed, step, rank) each step.
* Checkpoints (``CHECKPOINT_FORMAT``, written by the main rank with ``save_bundle``, atomic): ``param/<name>``,
  ``adam/<name>/exp_avg``, ``adam/<name>/exp_avg_sq``, ``adam/<name>/step``; metadata ``step``, ``losses``,
  ``seed``, ``settings``, ``identity``.  Resuming continues bit-exactly; a checkpoint of other settings or
  another identity raises ``TrainingMismatch`` naming each difference.
* ``save_trained`` / ``load_trained``: the trained tensors under the caller's versioned format (e.g.
  ``guidance_kit.deediff_heads/1``) with metadata ``identity``, ``settings``, ``steps``, ``final_loss``.
* Grad mode: ``grad_mode()`` leaves ``torch.inference_mode`` (ComfyUI runs every node inside it) and enables
  autograd; ``train`` runs in it, and the caller builds its trainables in it (parameters made under inference
  mode are inference tensors autograd cannot train: ``train`` refuses them by name).
* Memory of a step: ``step_memory(trainables, forward)`` measures, on a probe of one and two synthetic rows,
  the bytes autograd keeps per batch row (times ``ACTIVATION_FACTOR``) and the fixed bytes of the trainable
  parameters with their gradients and AdamW state (``TRAINING_STATE_BYTES`` per parameter).
* Seeds: ``offset_seed(seed, i)`` is ``seed + i`` wrapped into torch's seed range [0, 2**64).
"""
import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .bundles import BundleError, check_shapes, load_bundle, save_bundle

CHECKPOINT_FORMAT = "guidance_kit.training_checkpoint/1"
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SCHEDULES = ("constant", "cosine")
SEED_RANGE = 2 ** 64
# Peak memory of a forward + backward over the bytes autograd saves for backward: measured 1.4-1.8 on the toy
# classifier's LoRA student (peak RSS growth at 512 and 2048 rows per step vs the saved tensors of the probe); the
# rest is the gradients of activations alive during backward and the inputs drawn for the batch.
ACTIVATION_FACTOR = 2.0
TRAINING_STATE_BYTES = 16  # per float32 trainable parameter: value, gradient, AdamW exp_avg and exp_avg_sq


class TrainingMismatch(BundleError):
    """A checkpoint or trained bundle written for other settings or another model identity."""


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @classmethod
    def from_environment(cls, device: str | torch.device | None = None) -> "DistributedContext":
        """One process, or the process group that ``torchrun`` / ``accelerate launch`` describe in the environment."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        if world_size == 1:
            return cls(0, 1, device)
        missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset: launch with torchrun or "
                               "accelerate launch")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=int(os.environ["RANK"]), world_size=world_size)
        return cls(dist.get_rank(), world_size, device, owns_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous slice of a global batch of ``batch_size`` rows (split evenly)."""
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {self.world_size} processes")
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def all_mean(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor in place by its mean over the ranks (one all-reduce of a flat buffer)."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([tensor.detach().reshape(-1).float() for tensor in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        for tensor, part in zip(tensors, flat.split([tensor.numel() for tensor in tensors])):
            tensor.detach().copy_(part.view_as(tensor))

    def average_gradients(self, parameters) -> None:
        """All-reduce every parameter's gradient and divide by the world size (missing gradients count as 0)."""
        parameters = list(parameters)
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        self.all_mean([parameter.grad for parameter in parameters])

    def broadcast_flag(self, flag: bool) -> bool:
        """The main rank's ``flag`` on every rank (e.g. the decision to checkpoint and stop)."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([int(bool(flag))], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def broadcast_parameters(self, parameters) -> None:
        """Copy rank 0's values of ``parameters`` to every rank."""
        if self.world_size > 1:
            for parameter in parameters:
                dist.broadcast(parameter.data, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, wait: bool = True) -> None:
        """Leave the process group if ``from_environment`` joined it, after a barrier unless ``wait`` is false
        (gloo aborts a process that tears its group down while a peer still uses it)."""
        if self.owns_group and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        self.close(wait=error_type is None)


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    clip_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self):
        numbers = [self.lr, self.weight_decay, self.eps, *self.betas, self.clip_grad_norm or 1.0]
        if self.steps < 1 or self.batch_size < 1 or not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainSettings: need steps >= 1, batch_size >= 1, 0 <= warmup_steps < steps ({self})")
        if not all(math.isfinite(number) and number >= 0 for number in numbers) or self.lr <= 0:
            raise ValueError(f"TrainSettings: lr must be > 0, the other numbers finite and >= 0 ({self})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainSettings: schedule {self.schedule!r} is not one of {SCHEDULES}")

    def learning_rate(self, step: int) -> float:
        """The rate of the update from ``step`` to ``step + 1``: linear warm-up, then constant or cosine to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / (self.steps - self.warmup_steps)))


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    completed: bool

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def offset_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped into [0, 2**64) (torch's seed range): every seed a widget allows works."""
    return (int(seed) + int(offset)) % SEED_RANGE


@contextmanager
def grad_mode():
    """Autograd on, outside ``torch.inference_mode`` (ComfyUI's executor runs every node inside it): build
    trainables and the data autograd will see here; ``train`` enters it itself."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one optimiser step: ``per_row`` for each row of the batch, ``fixed`` whatever the batch."""

    per_row: int
    fixed: int

    def at(self, rows: int) -> int:
        return self.fixed + rows * self.per_row


def _saved_bytes(trainables: dict, forward: Callable[[int], torch.Tensor], rows: int) -> int:
    """Bytes of the tensors autograd saves for backward in ``forward(rows)`` (storages counted once, the
    parameters themselves left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in _all_parameters(trainables)}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with grad_mode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward(rows)
    return sum(storages.values()) + output.numel() * output.element_size()


def _all_parameters(trainables: dict) -> list[torch.Tensor]:
    return [p for item in trainables.values()
            for p in (item.parameters() if isinstance(item, torch.nn.Module) else [item])]


def step_memory(trainables: dict, forward: Callable[[int], torch.Tensor]) -> StepMemory:
    """Memory of one optimiser step over ``trainables``, measured before training on a probe: ``forward(rows)``
    computes the loss of ``rows`` synthetic rows of the real shapes.  Bytes per row: what autograd saves for
    backward at two rows minus at one, times ``ACTIVATION_FACTOR``; fixed: ``TRAINING_STATE_BYTES`` per
    trainable parameter plus what the probe saves whatever the rows."""
    one, two = (_saved_bytes(trainables, forward, rows) for rows in (1, 2))
    per_row = max(two - one, 0)
    parameters = sum(p.numel() for p in trainable_parameters(trainables).values())
    return StepMemory(math.ceil(ACTIVATION_FACTOR * per_row),
                      TRAINING_STATE_BYTES * parameters + math.ceil(ACTIVATION_FACTOR * max(one - per_row, 0)))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): draw step ``step``'s global batch from it."""
    return torch.Generator().manual_seed(_seed(seed, step, stream))


def trainable_parameters(trainables: dict) -> dict[str, torch.nn.Parameter]:
    """``{"name.sub": parameter}`` for the parameters that require gradients of each named module or parameter."""
    found = {}
    for name, item in trainables.items():
        if isinstance(item, torch.nn.Module):
            found.update({f"{name}.{sub}": p for sub, p in item.named_parameters() if p.requires_grad})
        elif isinstance(item, torch.Tensor) and item.requires_grad:
            found[name] = item
    if not found:
        raise ValueError("train: nothing to train (no parameter requires a gradient)")
    return found


def _json(value):
    return json.loads(json.dumps(value))


def _check_same(found: dict, expected: dict, what: str, where: str) -> None:
    differences = [f"{key} {found.get(key)!r} (file) vs {expected.get(key)!r} (now)"
                   for key in sorted(found.keys() | expected.keys()) if found.get(key) != expected.get(key)]
    if differences:
        raise TrainingMismatch(f"{where} was written for {what}: {'; '.join(differences)}")


def _save_checkpoint(path, parameters, optimizer, result: TrainResult, settings: TrainSettings, identity: dict):
    tensors = {}
    for name, parameter in parameters.items():
        state = optimizer.state[parameter]
        tensors[f"param/{name}"] = parameter
        tensors.update({f"adam/{name}/{key}": torch.as_tensor(state[key]).reshape(-1) if key == "step" else state[key]
                        for key in ("exp_avg", "exp_avg_sq", "step")})
    save_bundle(path, tensors, {"step": result.step, "losses": result.losses, "seed": settings.seed,
                                "settings": asdict(settings), "identity": identity}, CHECKPOINT_FORMAT)


def _restore_checkpoint(path, parameters, optimizer, settings: TrainSettings, identity: dict) -> TrainResult:
    where = f"training checkpoint {path}"
    bundle = load_bundle(path, CHECKPOINT_FORMAT, "train")
    _check_same(bundle.metadata.get("identity", {}), _json(identity), "another model identity (delete it to start "
                "over)", where)
    _check_same(bundle.metadata.get("settings", {}), _json(asdict(settings)), "other training settings (resume with "
                "the same settings or delete it to start over)", where)
    shapes = {}
    for name, parameter in parameters.items():
        shapes.update({f"param/{name}": tuple(parameter.shape), f"adam/{name}/exp_avg": tuple(parameter.shape),
                       f"adam/{name}/exp_avg_sq": tuple(parameter.shape), f"adam/{name}/step": (1,)})
    check_shapes(bundle.tensors, shapes, where)
    state = {}
    with torch.no_grad():
        for index, (name, parameter) in enumerate(parameters.items()):
            parameter.copy_(bundle.tensors[f"param/{name}"])
            state[index] = {key: bundle.tensors[f"adam/{name}/{key}"] for key in ("exp_avg", "exp_avg_sq")}
            state[index]["step"] = bundle.tensors[f"adam/{name}/step"].reshape(())
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return TrainResult(bundle.metadata["step"], list(bundle.metadata["losses"]), False)


@grad_mode()
def train(trainables: dict, loss_fn: Callable[[int, slice], torch.Tensor], settings: TrainSettings,
          context: DistributedContext | None = None, *, identity: dict | None = None, checkpoint=None,
          checkpoint_every: int = 0, on_step: Callable[[int, int, float], None] | None = None,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Run AdamW on ``trainables`` for ``settings.steps`` steps, resuming from ``checkpoint`` when it exists.

    ``trainables`` live on ``context.device`` (the caller moves them).  ``loss_fn(step, rows)``: the mean loss
    over rows ``rows`` of step ``step``'s global batch (see the module docstring).  ``identity``: JSON facts of
    what is trained (architecture, base weights' ``fingerprint``, shapes, any caller setting that changes the
    result); a checkpoint must match it and ``settings``.  ``on_step`` runs on the main rank only;
    ``should_stop(step)`` is asked there after each step and, if true, the run checkpoints and returns with
    ``completed`` false (e.g. on a ComfyUI interrupt), after ``on_step`` of that step.  Runs in ``grad_mode``;
    parameters made under ``torch.inference_mode`` are refused (ValueError naming them)."""
    context = context or DistributedContext()
    identity = identity or {}
    parameters = trainable_parameters(trainables)
    inference = [name for name, parameter in parameters.items() if parameter.is_inference()]
    if inference:
        raise ValueError(f"train: {', '.join(inference[:3])}{' ...' if len(inference) > 3 else ''} "
                         f"{'is an inference tensor' if len(inference) == 1 else 'are inference tensors'} (made "
                         "under torch.inference_mode, as ComfyUI runs nodes) that autograd cannot train; build the "
                         "trainables inside training.grad_mode()")
    rows = context.rows(settings.batch_size)
    context.broadcast_parameters(parameters.values())
    optimizer = torch.optim.AdamW(list(parameters.values()), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                  weight_decay=settings.weight_decay)
    result = TrainResult(0, [], False)
    if checkpoint is not None and Path(checkpoint).exists():
        result = _restore_checkpoint(checkpoint, parameters, optimizer, settings, identity)
    for step in range(result.step, settings.steps):
        torch.manual_seed(_seed(settings.seed, step, "rank", context.rank))
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate(step)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(step, rows)
        loss.backward()
        reported = loss.detach().float().reshape(1)
        context.average_gradients(parameters.values())
        context.all_mean([reported])
        if settings.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(parameters.values()), settings.clip_grad_norm)
        optimizer.step()
        result.step, value = step + 1, float(reported)
        if not math.isfinite(value):
            raise FloatingPointError(f"train: the loss is {value} at step {result.step}")
        result.losses.append(value)
        stop = context.broadcast_flag(context.is_main and should_stop is not None and should_stop(result.step))
        finished = stop or result.step == settings.steps
        if checkpoint is not None and (finished or (checkpoint_every and result.step % checkpoint_every == 0)):
            if context.is_main:
                _save_checkpoint(checkpoint, parameters, optimizer, result, settings, identity)
            context.barrier()
        if on_step is not None and context.is_main:
            on_step(result.step, settings.steps, value)
        if stop:
            return result
    result.completed = True
    return result


def save_trained(path, trainables: dict, format: str, identity: dict, settings: TrainSettings,
                 result: TrainResult) -> Path:
    """Write the trained parameters of ``trainables`` with ``identity``, ``settings``, ``steps``, ``final_loss``."""
    tensors = {name: parameter.detach() for name, parameter in trainable_parameters(trainables).items()}
    return save_bundle(path, tensors, {"identity": identity, "settings": asdict(settings), "steps": result.step,
                                       "final_loss": result.final_loss}, format)


def load_trained(path, format: str, where: str, trainables: dict, identity: dict | None = None) -> dict:
    """Load a ``save_trained`` bundle into ``trainables`` (exact keys and shapes) and return its metadata.

    ``identity``: facts the bundle must have been trained for (only the keys given are compared)."""
    parameters = trainable_parameters(trainables)
    bundle = load_bundle(path, format, where)
    found = bundle.metadata.get("identity", {})
    expected = _json(identity or {})
    _check_same({key: found.get(key) for key in expected}, expected, "another model", f"{where}: {path}")
    check_shapes(bundle.tensors, {name: tuple(parameter.shape) for name, parameter in parameters.items()},
                 f"{where}: {path}")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(bundle.tensors[name])
    return bundle.metadata
