"""DeeDiff on real ComfyUI sampling: the toy world DiT and a tiny random SD3 MMDiT, heads trained a few steps by
the training code; block rows evaluated, exits per row, chained block patches, errors, the train/load nodes and
``torchrun`` training."""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import comfy.model_patcher
import comfy.utils
import folder_paths

from harness import tiny_models
from harness.executor import run_node
from harness.sampling import cfg_guider, sample_guider

REPO = Path(__file__).resolve().parent.parent
STEPS = 4
CFG = 4.0


class BlockRows:
    """Counts the batch rows through each block of a network (forward hooks)."""

    def __init__(self, blocks):
        self.rows = [0] * len(blocks)
        self.handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(blocks)]

    def _hook(self, index):
        def hook(module, inputs, output):
            self.rows[index] += int(inputs[0].shape[0])
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def recorded_runs(model, clip, prompts, latent, seed):
    """What the Train node records: the model inputs of sampling ``prompts`` against the empty negative (STEPS
    euler/simple steps at CFG), with the model's block architecture."""
    from guidance_kit.nodes import deediff as adapter
    from guidance_kit.nodes.contract import encode_prompt

    recording = adapter.record_model_inputs(model, [encode_prompt(clip, p) for p in prompts],
                                            encode_prompt(clip, ""), latent, seed=seed, steps=STEPS, cfg=CFG,
                                            sampler_name="euler", scheduler="simple")
    return recording, adapter.architecture(model, "test")


def quick_heads(model, clip, prompts, latent, *, steps=40, seed=0):
    """Heads trained a few steps on a few recorded runs (the training code of the Train node)."""
    from guidance_kit.nodes import deediff as adapter
    from guidance_kit.samplers import training

    recording, arch = recorded_runs(model, clip, prompts, latent, seed)
    features = adapter.exit_features(model, arch, recording, 4096)
    settings = training.TrainSettings(steps=steps, batch_size=16, lr=3e-3, seed=seed)
    path = Path(folder_paths.get_temp_directory()) / f"deediff_test_{arch.name}.safetensors"
    adapter.train_heads(model, features, settings, path)
    return adapter.load_heads(path, "test"), features


def median_confidence(trained, features, exit_index=0) -> float:
    """A threshold that half of the recorded rows reach after block ``exit_index + 1``."""
    from guidance_kit.samplers import deediff

    with torch.no_grad():
        u = trained.heads(exit_index, features.tokens[:, exit_index].float(), features.vec)
    return float(deediff.confidence(u).median())


TOY_TRAINING_PROMPTS = ["a large red circle on the left", "a blue square above a mirror"]


@pytest.fixture(scope="module")
def toy_heads(toy):
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    return quick_heads(toy.model, toy.clip, TOY_TRAINING_PROMPTS, run_node(ToyWorldEmptyLatent, 2)[0])


def toy_sample(model, clip, prompt="a small green triangle in the center", batch=3, seed=5):
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    guider = cfg_guider(model, clip.encode_from_tokens_scheduled(clip.tokenize(prompt)),
                        clip.encode_from_tokens_scheduled(clip.tokenize("")), CFG)
    with BlockRows(model.model.diffusion_model.blocks) as counter:
        samples = sample_guider(guider, run_node(ToyWorldEmptyLatent, batch)[0], steps=STEPS, scheduler="simple",
                                seed=seed)
    return samples, counter.rows, guider


def last_run(guider):
    from guidance_kit.nodes.contract.stats import stats_sink

    return stats_sink(guider.model_patcher).last


def test_threshold_one_is_the_full_model(toy, toy_heads):
    from guidance_kit.nodes.deediff import patch_deediff

    model, clip = toy.model, toy.clip
    reference, full_rows, _ = toy_sample(model, clip)
    samples, rows, guider = toy_sample(patch_deediff(model, toy_heads[0], 1.0), clip)
    assert torch.equal(samples, reference)
    assert rows == full_rows == [STEPS * 2 * 3] * 8
    run = last_run(guider)
    assert all(e.signals["blocks"] == e.signals["full_blocks"] == 6 * 8 for e in run.evaluations)
    assert run.events == []


def test_rows_exit_on_their_own_and_skip_the_remaining_blocks(toy, toy_heads):
    from guidance_kit.nodes.deediff import patch_deediff
    from guidance_kit.samplers.stats_plot import signal_curves

    model, clip = toy.model, toy.clip
    trained, features = toy_heads
    threshold = median_confidence(trained, features)
    reference, full_rows, _ = toy_sample(model, clip)
    samples, rows, guider = toy_sample(patch_deediff(model, trained, threshold), clip)
    run = last_run(guider)
    depths = [e.signals["exit_depth"] for e in run.evaluations]
    assert sum(map(sum, depths)) == sum(rows) == sum(e.signals["blocks"] for e in run.evaluations) < sum(full_rows)
    assert rows[0] == full_rows[0] and rows[1] < full_rows[1]  # every row runs block 1; some stop there
    assert any(1 in d for d in depths) and len({depth for d in depths for depth in d}) > 1
    assert any(d[:3] != d[3:] for d in depths)  # cond rows [:3] and uncond rows [3:] exit independently
    assert 0 < float((samples - reference).abs().mean()) < 0.5
    assert "exit_depth" in signal_curves(run)  # the Run Stats plot draws a panel of exit depth per step
    assert [label for _, label in run.events][0].startswith("first early exit") and len(run.events) == 1


def test_another_block_patch_stays_chained(toy, toy_heads):
    from guidance_kit.nodes.deediff import patch_deediff

    model, clip = toy.model, toy.clip
    trained, features = toy_heads
    seen = []

    def other(args, extra):
        seen.append(args["img"].shape[0])
        return extra["original_block"](args)

    patched = model.clone()
    patched.set_model_patch_replace(other, "dit", "single_block", 1)
    _, rows, _ = toy_sample(patch_deediff(patched, trained, median_confidence(trained, features)), clip)
    assert seen and sum(seen) == rows[1] < STEPS * 6


def test_stacks_with_adaptive_guidance(toy, toy_heads):
    """AG drops unconditional rows, DeeDiff exits the rows that remain: both savings in one run record."""
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceModelPatch
    from guidance_kit.nodes.deediff import patch_deediff

    model, clip = toy.model, toy.clip
    trained, features = toy_heads
    stacked = patch_deediff(run_node(AdaptiveGuidanceModelPatch, model, 0.9, "auto", 0.0, 1.0)[0], trained,
                            median_confidence(trained, features))
    _, rows, guider = toy_sample(stacked, clip)
    run = last_run(guider)
    assert run.rows < run.baseline_rows  # AG skipped unconditional rows
    assert sum(e.signals["blocks"] for e in run.evaluations) == sum(rows) < 8 * run.rows  # and DeeDiff exited rows


def test_installing_deediff_twice_replaces_the_first(toy, toy_heads):
    from guidance_kit.nodes.deediff import patch_deediff

    model, clip = toy.model, toy.clip
    trained, features = toy_heads
    once = toy_sample(patch_deediff(model, trained, median_confidence(trained, features)), clip)
    twice = toy_sample(patch_deediff(patch_deediff(model, trained, 0.0), trained, median_confidence(trained, features)),
                       clip)
    assert torch.equal(once[0], twice[0]) and once[1] == twice[1]


def test_heads_for_another_model_or_a_unet_are_errors(toy, toy_heads, tiny_eps):
    from guidance_kit.nodes import deediff as adapter
    from guidance_kit.nodes import toyworld
    from guidance_kit.toyworld import weights

    trained = toy_heads[0]
    with pytest.raises(ValueError, match=r"DeeDiff Early Exit \(Guidance Kit\): 'model' is a BaseModel .*UNet"):
        adapter.patch_deediff(tiny_eps.patcher, trained, 0.9)
    with pytest.raises(ValueError, match=r"DeeDiff Early Exit \(Guidance Kit\): 'heads' were trained for another "
                                         r"model \(blocks 8 \(heads\) vs 4"):
        adapter.patch_deediff(toyworld.load_model(weights.WEAK_WEIGHTS), trained, 0.9)
    retrained = copy.deepcopy(toy.model.model)
    with torch.no_grad():
        retrained.diffusion_model.blocks[0].attn.proj.weight.add_(1e-3)
    patcher = comfy.model_patcher.ModelPatcher(retrained, load_device=toy.model.load_device,
                                               offload_device=toy.model.offload_device)
    with pytest.raises(ValueError, match=r"'heads' were trained for another model \(weights ToyWorldModel:"):
        adapter.patch_deediff(patcher, trained, 0.9)
    for bad in (float("nan"), 1.5):
        with pytest.raises(ValueError, match="'threshold'"):
            adapter.patch_deediff(toy.model, trained, bad)


def test_heads_bundle_checks(tmp_path):
    from guidance_kit.nodes.deediff import load_heads

    (tmp_path / "junk.safetensors").write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="DeeDiff Load"):
        load_heads(tmp_path / "junk.safetensors", "DeeDiff Load Heads 'heads'")


def sd3_sample(sd3, model):
    """Samples of the tiny SD3 fixture's prompts through ``model`` and the rows through each of its joint blocks."""
    guider = cfg_guider(model, sd3.positive, sd3.negative, CFG)
    with BlockRows(sd3.patcher.model.diffusion_model.joint_blocks) as counter:
        samples = sample_guider(guider, sd3.empty_latent(2), steps=STEPS, scheduler="simple", seed=3)
    return samples, counter.rows


def test_sd3_mmdit_trains_through_the_node_and_exits_double_blocks(sd3, deediff_folder, monkeypatch):
    from guidance_kit.nodes import deediff as adapter

    folder = deediff_folder
    ticks = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: ticks.append(
        (value, total)))
    clip = tiny_models.WordClip(sd3)
    run_node(adapter.DeeDiffTrain, sd3.patcher, clip, "a cat\na dog", "", sd3.empty_latent(2), 0, STEPS, CFG,
                                 "euler", "simple", 1.0, 30, 64, 16, 3e-3, 0, "tiny_sd3")
    assert (folder / "tiny_sd3.safetensors").is_file() and not any((folder / ".checkpoints").glob("*"))
    total = 2 * STEPS + 2 * STEPS * 2 * 2 + 30
    assert ticks[-1] == (total, total)
    trained = run_node(adapter.DeeDiffLoad, "tiny_sd3.safetensors")[0]
    assert trained.identity["architecture"] == "sd3_mmdit" and trained.identity["blocks"] == 2
    assert trained.metadata["settings"]["steps"] == 30 and trained.identity["data"]["prompts"] == 2

    reference, full_rows = sd3_sample(sd3, sd3.patcher)
    unchanged, rows = sd3_sample(sd3, run_node(adapter.DeeDiffModelPatch, sd3.patcher, trained, 1.0)[0])
    assert torch.equal(unchanged, reference) and rows == full_rows
    _, rows = sd3_sample(sd3, run_node(adapter.DeeDiffModelPatch, sd3.patcher, trained, 0.0)[0])
    assert rows == [full_rows[0], 0]  # every row leaves after the first double block
    with pytest.raises(ValueError, match=r"'heads' were trained for another model \(architecture"):
        adapter.patch_deediff(sd3.patcher, trained.__class__(trained.heads, {**trained.identity, "architecture":
                                                                             "toy_dit"}, {}), 0.9)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


# Two gloo ranks average the gradients of their halves of each batch where one process takes the mean of the whole
# batch: the same math in another float32 summation order.  Over 8 AdamW steps at lr 3e-3 that moves no head
# parameter by more than ~1e-6 (a wrong slice or a missing average moves them by > 1e-3).
WORLD_SIZE_TOLERANCE = 1e-5


def train_on_one_and_two_processes(tmp_path, options: list[str]) -> tuple[dict, dict]:
    """The tensors scripts/train_deediff.py writes with ``options`` on one process and under torchrun on two."""
    from safetensors.torch import load_file

    script = str(REPO / "scripts" / "train_deediff.py")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, script, str(one), *options], check=True, env=environment, timeout=600,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port()), script, str(two), *options], check=True,
                   env=environment, timeout=600, capture_output=True)
    return load_file(one), load_file(two)


def test_training_under_torchrun_matches_one_process(tmp_path):
    a, b = train_on_one_and_two_processes(tmp_path, ["--cpu", "--max-prompts", "2", "--images-per-prompt", "2",
                                                     "--sample-steps", "3", "--rows", "24", "--steps", "8",
                                                     "--batch-size", "8"])
    assert a.keys() == b.keys() and len(a) == 7 * 4
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"1 vs 2 processes: max head parameter difference {difference:.3g}")
    assert difference < WORLD_SIZE_TOLERANCE
