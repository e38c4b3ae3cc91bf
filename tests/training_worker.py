"""A tiny training problem for tests/test_training.py, also a script for ``torchrun`` / ``accelerate launch``.

Three linear heads (scaled by a bare parameter) learn a frozen random "teacher" on synthetic inputs drawn per step
from ``step_generator``.  As a script: ``python -m torch.distributed.run --nproc_per_node 2 tests/training_worker.py
OUT [--checkpoint PATH --stop-at STEP]`` trains (stopping at STEP, then resuming from the checkpoint) and the main
rank writes the trained bundle to OUT.
"""
import argparse
import sys
from pathlib import Path

import torch

try:
    from guidance_kit.samplers import bundles, training  # under pytest, the pack is imported as guidance_kit
except ImportError:  # run as a script by torchrun / accelerate launch
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    from samplers import bundles, training

FORMAT = "guidance_kit.test_heads/1"
WIDTH, OUTPUTS, HEADS = 8, 4, 3
SETTINGS = training.TrainSettings(steps=24, batch_size=16, lr=0.1, weight_decay=0.01, warmup_steps=2, seed=7)


def teacher(seed: int = 0) -> torch.nn.Linear:
    """The frozen model whose outputs the heads learn (its fingerprint is the run's identity)."""
    torch.manual_seed(1000 + seed)
    return torch.nn.Linear(WIDTH, OUTPUTS * HEADS).requires_grad_(False)


def identity(model: torch.nn.Linear) -> dict:
    return {"architecture": f"test_heads/{WIDTH}x{OUTPUTS}x{HEADS}",
            "fingerprint": bundles.fingerprint(model.state_dict(), "teacher"), "heads": HEADS}


def heads(seed: int = 0) -> dict:
    """Fresh trainables: a module list of heads and a bare parameter."""
    torch.manual_seed(seed)
    return {"heads": torch.nn.ModuleList(torch.nn.Linear(WIDTH, OUTPUTS) for _ in range(HEADS)),
            "scale": torch.nn.Parameter(torch.full((HEADS,), 0.5))}


def loss_fn(trainables: dict, model: torch.nn.Linear, settings: training.TrainSettings = SETTINGS, crash_at=None,
            dropout: float = 0.0):
    """Mean squared error of the heads over rows ``rows`` of step ``step``'s global batch (``dropout`` draws from
    torch's global RNG)."""
    def loss(step: int, rows: slice) -> torch.Tensor:
        if step == crash_at:
            raise KeyboardInterrupt(f"interrupted at step {step}")
        inputs = torch.randn(settings.batch_size, WIDTH, generator=training.step_generator(settings.seed, step))[rows]
        inputs = torch.nn.functional.dropout(inputs, dropout)
        targets = model(inputs).view(-1, HEADS, OUTPUTS)
        outputs = torch.stack([scale * head(inputs) for head, scale in zip(trainables["heads"], trainables["scale"])],
                              dim=1)
        return (outputs - targets).square().mean()
    return loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop there (checkpoint), then resume into fresh heads")
    args = parser.parse_args(argv)
    model = teacher()
    with training.DistributedContext.from_environment() as context:
        def run(trainables, should_stop=None):
            return training.train(trainables, loss_fn(trainables, model), SETTINGS, context, identity=identity(model),
                                  checkpoint=args.checkpoint, should_stop=should_stop)
        trainables = heads(seed=context.rank)  # unsynchronised on purpose: train() broadcasts rank 0's
        if args.stop_at is not None:
            assert not run(trainables, lambda step: step >= args.stop_at).completed
            trainables = heads(seed=10 + context.rank)
        result = run(trainables)
        if context.is_main:
            training.save_trained(args.out, trainables, FORMAT, identity(model) | {"world_size": context.world_size},
                                  SETTINGS, result)


if __name__ == "__main__":
    main()
