"""The toy world's training script: cycle schedule, data mixes, resumable checkpoints (tiny runs)."""
import numpy as np
import pytest
import torch

from guidance_kit.toyworld import scenes, train
from guidance_kit.toyworld.model import ToyClassifier


def classifier_run(work_dir, cycles):
    torch.manual_seed(0)
    classifier = ToyClassifier(len(scenes.COLOURS), len(scenes.SHAPES), len(scenes.POSITIONS))
    work_dir.mkdir(parents=True, exist_ok=True)
    run = train.StageRun("classifier", {"classifier": classifier}, cycles, 1e-3, work_dir)
    return run, lambda batch, generator: train.classifier_loss(classifier, batch, generator)


def train_to(run, loss_fn, stop_at=None):
    train.run_stage(run, loss_fn, seed=0, stage_index=2, batch=4, log_every=100, stop_at=stop_at,
                    kind_mix={"single": 1.0})
    return {key: value.clone() for key, value in run.ema["classifier"].state_dict().items()}


def test_schedule_restarts_each_cycle_and_switches_mix():
    run = object.__new__(train.StageRun)
    run.cycles, run.peak_lr = train.CYCLES["main"], 5e-4
    first, second, _ = (cycle[0] for cycle in run.cycles)
    assert run.lr(first - 1) == pytest.approx(5e-5, rel=1e-3)  # end of cycle 1: 10% of its peak
    assert run.lr(first + second // 20 - 1) == pytest.approx(0.6 * 5e-4)  # warmed up to cycle 2's peak
    assert run.mix_at(first + second - 1) is train.KIND_MIX
    assert run.mix_at(first + second) is train.COMPOSITION_MIX


def test_partial_captions_name_one_object_of_a_two_object_scene():
    batch = train.scene_batch(np.random.default_rng(3), 64, {"partial": 1.0})
    for scene in batch:
        assert scene.spec["kind"] == "relation"
        colour, shape = scene.prompt.split()[1:]
        assert {"colour": colour, "shape": shape} in scene.spec["objects"]
        assert scenes.TOKEN_ID[scenes.UNK] not in scenes.tokenize(scene.prompt)


def test_interrupted_and_extended_runs_match_an_uninterrupted_one(tmp_path):
    uninterrupted = train_to(*classifier_run(tmp_path / "a", ((3, 1.0), (3, 0.5))))

    run, loss_fn = classifier_run(tmp_path / "b", ((3, 1.0),))
    train_to(run, loss_fn)  # a finished one-cycle run...
    run, loss_fn = classifier_run(tmp_path / "b", ((3, 1.0), (3, 0.5)))
    assert run.step == 3  # ...resumes under a schedule that extends it
    train_to(run, loss_fn, stop_at=4)
    run, loss_fn = classifier_run(tmp_path / "b", ((3, 1.0), (3, 0.5)))
    resumed = train_to(run, loss_fn)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match="different configuration or schedule"):
        classifier_run(tmp_path / "b", ((4, 1.0), (3, 0.5)))
