"""DeeDiff joint training (heads + low-rank adapters on every block, ``guidance_kit.deediff/2``) on real ComfyUI
sampling: the toy world DiT and a tiny random SD3 MMDiT trained a few steps by the training code; the bundle
round-trips, the adapters are a weight patch on the clone only, threshold 1.0 is the adapted full model bit-exactly,
exits happen, other models are refused, and ``torchrun`` with 2 gloo processes follows one process."""

import pytest
import torch
from test_deediff import (
    CFG,
    STEPS,
    TOY_TRAINING_PROMPTS,
    WORLD_SIZE_TOLERANCE,
    recorded_runs,
    sd3_sample,
    toy_sample,
    train_on_one_and_two_processes,
)

import comfy.model_management
import folder_paths

from harness import tiny_models
from harness.executor import run_node

RANK = 2


def quick_joint(model, clip, prompts, latent, name, *, steps=6, seed=0):
    """Heads and rank-RANK adapters trained a few steps on a few recorded runs (the Train node's code)."""
    from pathlib import Path

    from guidance_kit.nodes import deediff as adapter
    from guidance_kit.samplers import training

    recording, arch = recorded_runs(model, clip, prompts, latent, seed)
    data = adapter.joint_data(model, arch, recording, 4096)
    settings = training.TrainSettings(steps=steps, batch_size=8, lr=1e-2, seed=seed)
    path = Path(folder_paths.get_temp_directory()) / f"deediff_joint_test_{name}.safetensors"
    trained, result = adapter.train_joint(model, data, settings, path, rank=RANK, alpha=float(RANK),
                                          distill_weight=1.0)
    return trained, adapter.load_heads(path, "test"), data, result


@pytest.fixture(scope="module")
def toy_joint(toy):
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    return quick_joint(toy.model, toy.clip, TOY_TRAINING_PROMPTS, run_node(ToyWorldEmptyLatent, 2)[0], "toy")


def test_joint_bundle_round_trips_with_adapters_on_every_block(toy, toy_joint):
    from guidance_kit.samplers import deediff

    trained, loaded, _, result = toy_joint
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert loaded.adapters is not None and loaded.metadata["steps"] == 6
    names = loaded.adapters.names
    assert len(names) == 8 * 4 and {name.split(".")[1] for name in names} == {str(i) for i in range(8)}
    assert not any("modulation" in name for name in names)
    for before, after in zip([*trained.heads.state_dict().values(), *trained.adapters.state_dict().values()],
                             [*loaded.heads.state_dict().values(), *loaded.adapters.state_dict().values()]):
        assert torch.equal(before, after)
    assert all(float(up.abs().max()) > 0 for up, _ in loaded.adapters.factors().values())  # trained away from 0
    assert loaded.identity["adapters"]["rank"] == RANK and deediff.JOINT_FORMAT.endswith("/2")


def test_adapted_threshold_one_is_the_adapted_full_model_and_the_input_is_untouched(toy, toy_joint):
    from guidance_kit.nodes.contract import model_identity
    from guidance_kit.nodes.deediff import apply_adapters, patch_deediff

    model, clip = toy.model, toy.clip
    loaded = toy_joint[1]
    identity = model_identity(model)
    original, full_rows, _ = toy_sample(model, clip)
    adapted, _, _ = toy_sample(apply_adapters(model, loaded), clip)
    exits, rows, _ = toy_sample(patch_deediff(model, loaded, 1.0), clip)
    assert torch.equal(exits, adapted) and rows == full_rows
    assert not torch.equal(adapted, original)  # the adapters act
    assert model.patches == {} and model_identity(model) == identity
    again, _, _ = toy_sample(model, clip)
    assert torch.equal(again, original)  # the adapters left with the clone


def test_the_weight_patch_is_the_update_training_learnt(toy, toy_joint):
    """Training runs the merged weights through ``functional_call``; sampling through ComfyUI's LoRA weight patch."""
    from guidance_kit.nodes import deediff as adapter

    model = toy.model
    loaded, data = toy_joint[1], toy_joint[2]
    arch = adapter.architecture(model, "test")
    x, sigma, inputs = data.recording.rows(torch.arange(4))
    state = adapter.frozen_state(model)
    with torch.no_grad():
        hidden, vec = adapter.block_outputs(model, arch, x, sigma, inputs,
                                            adapted=adapter.adapted_state(state, loaded.adapters))
        trained_output = adapter.exit_predictions(model, arch, hidden[-1:], vec, state)[0]
    patched = adapter.apply_adapters(model, loaded)
    comfy.model_management.load_models_gpu([patched])
    hidden, vec = adapter.block_outputs(patched, arch, x, sigma, inputs)
    patched_output = adapter.exit_predictions(patched, arch, hidden[-1:], vec)[0]
    comfy.model_management.load_models_gpu([model])
    frozen_output = data.targets[:4]
    assert torch.allclose(patched_output, trained_output, atol=1e-5)
    assert float((patched_output - frozen_output).abs().max()) > 1e-4


def test_rows_exit_with_adapters(toy, toy_joint):
    from guidance_kit.nodes.deediff import patch_deediff

    _, rows, guider = toy_sample(patch_deediff(toy.model, toy_joint[1], 0.0), toy.clip)
    assert rows == [STEPS * 2 * 3] + [0] * 7  # every row leaves after block 1


def test_installing_twice_applies_the_adapters_once(toy, toy_joint):
    from guidance_kit.nodes.deediff import patch_deediff

    loaded = toy_joint[1]
    once = toy_sample(patch_deediff(toy.model, loaded, 1.0), toy.clip)
    twice = toy_sample(patch_deediff(patch_deediff(toy.model, loaded, 0.0), loaded, 1.0), toy.clip)
    assert torch.equal(once[0], twice[0]) and once[1] == twice[1]


def test_a_joint_bundle_for_another_model_is_refused(toy, toy_joint, sd3):
    from guidance_kit.nodes import deediff as adapter
    from guidance_kit.nodes import toyworld
    from guidance_kit.toyworld import weights

    loaded = toy_joint[1]
    with pytest.raises(ValueError, match=r"'heads' were trained for another model \(blocks 8 \(heads\) vs 4"):
        adapter.patch_deediff(toyworld.load_model(weights.WEAK_WEIGHTS), loaded, 0.9)
    with pytest.raises(ValueError, match=r"'heads' were trained for another model \(architecture 'toy_dit'"):
        adapter.patch_deediff(sd3.patcher, loaded, 0.9)


def test_sd3_mmdit_trains_jointly_through_the_node(sd3, deediff_folder):
    from guidance_kit.nodes import deediff as adapter

    folder = deediff_folder
    clip = tiny_models.WordClip(sd3)
    run_node(adapter.DeeDiffTrain, sd3.patcher, clip, "a cat\na dog", "", sd3.empty_latent(2), 0, STEPS, CFG,
             "euler", "simple", 1.0, 6, 64, 8, 1e-2, 0, "tiny_sd3_joint", adapter_rank=RANK, distill_weight=1.0)
    path = folder / "tiny_sd3_joint.safetensors"
    assert path.is_file() and b'"guidance_kit.deediff/2"' in path.read_bytes()[:100000]
    trained = run_node(adapter.DeeDiffLoad, "tiny_sd3_joint.safetensors")[0]
    assert trained.identity["architecture"] == "sd3_mmdit" and trained.adapters is not None
    assert {name.split(".")[2] for name in trained.adapters.names} == {"context_block", "x_block"}

    adapted, full_rows = sd3_sample(sd3, adapter.apply_adapters(sd3.patcher, trained))
    exits, rows = sd3_sample(sd3, run_node(adapter.DeeDiffModelPatch, sd3.patcher, trained, 1.0)[0])
    assert torch.equal(exits, adapted) and rows == full_rows
    assert sd3.patcher.patches == {}
    _, rows = sd3_sample(sd3, run_node(adapter.DeeDiffModelPatch, sd3.patcher, trained, 0.0)[0])
    assert rows == [full_rows[0], 0]


def test_joint_training_under_torchrun_matches_one_process(tmp_path):
    """Without distillation (``--distill 0``): with it, the last block's adapters start on a gradient that is pure
    float noise (the adapted output equals the frozen one up to rounding, and 1 and 2 processes round differently:
    4 vs 8 rows per forward), which AdamW's first steps turn into lr-sized updates of either sign (measured: 3.3e-3
    at lr 3e-3, on the last block's adapters only)."""
    a, b = train_on_one_and_two_processes(tmp_path, ["--cpu", "--max-prompts", "2", "--images-per-prompt", "2",
                                                     "--sample-steps", "3", "--rows", "24", "--steps", "4",
                                                     "--batch-size", "8", "--rank", str(RANK), "--distill", "0"])
    assert a.keys() == b.keys() and len(a) == 7 * 4 + 2 * 8 * 4
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"1 vs 2 processes: max parameter difference {difference:.3g}")
    assert difference < WORLD_SIZE_TOLERANCE


def test_the_shipped_joint_toy_bundle_fits_the_toy_model(toy):
    from guidance_kit.nodes.deediff import DeeDiffLoad, apply_adapters, patch_deediff

    shipped = run_node(DeeDiffLoad, "toy_dit_joint.safetensors")[0]
    assert shipped.adapters is not None and shipped.identity["adapters"]["rank"] == 4
    assert len(shipped.adapters.names) == 32
    adapted, full_rows, _ = toy_sample(apply_adapters(toy.model, shipped), toy.clip)
    exits, rows, _ = toy_sample(patch_deediff(toy.model, shipped, 1.0), toy.clip)
    assert torch.equal(exits, adapted) and rows == full_rows
    _, rows, _ = toy_sample(patch_deediff(toy.model, shipped, 0.8), toy.clip)
    assert sum(rows) < sum(full_rows)


def test_joint_memory_needs_grow_with_the_batch(toy):
    from guidance_kit.nodes import deediff as adapter

    arch = adapter.architecture(toy.model, "test")

    def needs(batch_size):
        return {need.input: need.bytes for need in adapter.memory_needs(
            toy.model, arch, toy.latent(2), toy.negative, runs=2, rows_per_run=16, training_rows=32,
            batch_size=batch_size, hidden=0, joint=True)}

    small, large = needs(8), needs(16)
    assert large["batch_size"] == 2 * small["batch_size"] > 8 * 8 * 80 * 128 * 4  # every block's activations
    assert set(small) == {"prompts", "training_rows", "batch_size"}
