"""The shared training core: the loss goes down, 2 processes (torchrun, gloo) match 1, resume, mismatches, bundles."""
import dataclasses
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import training_worker as worker
from guidance_kit.samplers import training
from guidance_kit.samplers.bundles import BundleError

WORKER = Path(worker.__file__)
# Two ranks average the means of their 8-row halves where one process takes the mean of 16 rows: the same math in
# another float32 summation order (~1e-7 relative per gradient).  AdamW moves each parameter by at most ~lr per step,
# so 24 steps at lr 0.1 keep such rounding far below 1e-5 (measured: ~1e-7); a wrong slice, a missing average or
# an unsynchronised initialisation moves parameters by > 1e-2.
WORLD_SIZE_TOLERANCE = 1e-5


def run(trainables=None, model=None, settings=worker.SETTINGS, **options):
    trainables = worker.heads() if trainables is None else trainables
    model = worker.teacher() if model is None else model
    loss = worker.loss_fn(trainables, model, settings, options.pop("crash_at", None), options.pop("dropout", 0.0))
    result = training.train(trainables, loss, settings, identity=worker.identity(model), **options)
    return trainables, result


def parameters(trainables) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in training.trainable_parameters(trainables).items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command: list[str], out: Path) -> dict[str, torch.Tensor]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=WORKER.parent.parent,
                            env=environment | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"{command[2]} took {time.monotonic() - started:.1f} s")
    bundle = worker.bundles.load_bundle(out, worker.FORMAT, "test")
    assert bundle.metadata["identity"]["world_size"] == 2 and bundle.metadata["steps"] == worker.SETTINGS.steps
    return bundle.tensors


def held_out_loss(trainables) -> float:
    with torch.no_grad():
        return float(worker.loss_fn(trainables, worker.teacher())(-1, slice(None)))  # step -1: never trained on


def test_the_loss_goes_down_and_progress_is_reported():
    calls = []
    trainables, result = run(on_step=lambda step, total, loss: calls.append((step, total, loss)))
    assert result.completed and result.step == worker.SETTINGS.steps
    assert [call[:2] for call in calls] == [(step + 1, worker.SETTINGS.steps) for step in range(result.step)]
    assert [call[2] for call in calls] == result.losses
    assert result.final_loss < 0.1 * result.losses[0], result.losses
    assert held_out_loss(trainables) < 0.1 * held_out_loss(worker.heads())


def test_two_processes_under_torchrun_match_one_process(tmp_path):
    """2 gloo ranks, stopped at step 11 (the main rank's decision, broadcast) and resumed, vs 1 uninterrupted."""
    out = tmp_path / "two.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(out), "--checkpoint",
               str(tmp_path / "checkpoint.safetensors"), "--stop-at", "11"]
    two = launch(command, out)
    one = parameters(run()[0])
    difference = max_difference(one, two)
    print(f"1 vs 2 processes: max parameter difference {difference:.3g}")
    assert difference < WORLD_SIZE_TOLERANCE
    assert max_difference(one, parameters(worker.heads())) > 0.1  # the heads did train


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate is not installed")
def test_two_processes_under_accelerate_launch_match_one_process(tmp_path):
    """``--multi_gpu`` with no GPU visible: accelerate's ``--cpu --num_processes 2`` starts one process (mpirun)."""
    out = tmp_path / "two.safetensors"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(WORKER), str(out)]
    assert max_difference(parameters(run()[0]), launch(command, out)) < WORLD_SIZE_TOLERANCE


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Crashed after the step-15 checkpoint, resumed into other initial heads; dropout uses torch's global RNG."""
    checkpoint = tmp_path / "checkpoint.safetensors"
    uninterrupted, expected = run(dropout=0.2)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=checkpoint, checkpoint_every=5, crash_at=17, dropout=0.2)
    resumed, result = run(worker.heads(seed=3), checkpoint=checkpoint, checkpoint_every=5, dropout=0.2)
    assert result.completed and result.losses == expected.losses
    assert max_difference(parameters(uninterrupted), parameters(resumed)) == 0.0


def test_resuming_with_other_settings_or_another_model_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint.safetensors"
    assert not run(checkpoint=checkpoint, should_stop=lambda step: step == 4)[1].completed
    with pytest.raises(training.TrainingMismatch, match=r"other training settings.*lr 0\.1 \(file\) vs 0\.01 \(now\)"):
        run(checkpoint=checkpoint, settings=dataclasses.replace(worker.SETTINGS, lr=0.01))
    with pytest.raises(training.TrainingMismatch, match="another model identity.*fingerprint 'teacher:"):
        run(model=worker.teacher(seed=1), checkpoint=checkpoint)


def test_the_trained_bundle_loads_back_with_identity_and_shape_checks(tmp_path):
    path = tmp_path / "heads.safetensors"
    model = worker.teacher()
    trainables, result = run(model=model)
    training.save_trained(path, trainables, worker.FORMAT, worker.identity(model), worker.SETTINGS, result)
    loaded = worker.heads(seed=5)
    metadata = training.load_trained(path, worker.FORMAT, "Test Load 'heads'", loaded, worker.identity(model))
    assert max_difference(parameters(trainables), parameters(loaded)) == 0.0
    assert metadata["steps"] == 24 and metadata["final_loss"] == result.final_loss
    assert metadata["settings"]["lr"] == worker.SETTINGS.lr
    with pytest.raises(training.TrainingMismatch, match="Test Load 'heads'.*another model.*fingerprint"):
        training.load_trained(path, worker.FORMAT, "Test Load 'heads'", loaded, worker.identity(worker.teacher(seed=1)))
    wider = {"heads": torch.nn.ModuleList(torch.nn.Linear(worker.WIDTH, 5) for _ in range(3)),
             "scale": torch.nn.Parameter(torch.ones(3))}
    with pytest.raises(BundleError, match=r"heads.0.weight has shape \(4, 8\), expected \(5, 8\)"):
        training.load_trained(path, worker.FORMAT, "Test Load 'heads'", wider)
    with pytest.raises(BundleError, match="is not a guidance_kit.other/1 file"):
        training.load_trained(path, "guidance_kit.other/1", "Test Load 'heads'", loaded)


def test_settings_and_launch_environment_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="schedule 'linear'"):
        training.TrainSettings(steps=4, batch_size=2, schedule="linear")
    with pytest.raises(ValueError, match="lr must be > 0"):
        training.TrainSettings(steps=4, batch_size=2, lr=float("nan"))
    with pytest.raises(ValueError, match="batch_size 3 does not split evenly over 2 processes"):
        training.DistributedContext(rank=1, world_size=2).rows(3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        training.DistributedContext.from_environment("cpu")
    monkeypatch.delenv("WORLD_SIZE")
    assert training.DistributedContext.from_environment("cpu") == training.DistributedContext()


def test_offset_seeds_wrap_into_torchs_seed_range():
    """seed + i for prompt i: the largest seed a widget allows (2**64 - 1) plus 1 is 0, not an overflow."""
    assert training.offset_seed(2 ** 64 - 1, 1) == 0 and training.offset_seed(5, 2) == 7
    torch.manual_seed(training.offset_seed(2 ** 64 - 1, 0))  # accepted: the top of torch's range
