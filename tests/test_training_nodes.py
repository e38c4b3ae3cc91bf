"""The three training nodes (DeeDiff Train Heads, PPAP Train Experts, LinearAG Calibrate) run as ComfyUI's
executor runs them (``run_node``): they train and write their file; oversize inputs, bad file names and
seeds at the widget's limit are handled before any compute; a user file never replaces a shipped artifact
in any loader (``nodes/contract/model_files.py``, ``nodes/contract/training_guard.py``)."""
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import comfy.model_management
import comfy.samplers
import folder_paths

from harness.executor import run_node

FREE_MEMORY = 8 * 2 ** 30  # what get_free_memory reports in the memory tests (a typical machine, not this one's)
REFUSAL_SECONDS = 2.0  # a refusal before compute: the estimate and the probe only
WRITERS = {  # folder: (node display name in errors, shipped artifact's stem)
    "deediff": ("DeeDiff Train Heads (Guidance Kit)", "toy_dit_heads"),
    "ppap": ("PPAP Train Experts", "toy_ppap_experts"),
    "linear_ag": ("LinearAG Calibrate", "toy_dit_euler_simple_20_cfg4"),
}


def latent(batch: int) -> dict:
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

    return run_node(ToyWorldEmptyLatent, batch)[0]


@pytest.fixture
def user_folders(tmp_path, monkeypatch):
    """models/<folder>/ of every pack folder redirected to tmp_path/<folder> (the shipped files stay shipped)."""
    from guidance_kit.nodes import node_classes
    from guidance_kit.nodes.contract.model_files import FOLDERS

    node_classes()  # every node module imported: folders they would register are registered before the redirect
    folders = {}
    for folder in FOLDERS:
        folders[folder] = tmp_path / folder
        folders[folder].mkdir()
        others = folder_paths.folder_names_and_paths[folder][0][1:]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, folder, ([str(folders[folder]), *others],
                                                                          {".safetensors"}))
        folder_paths.filename_list_cache.pop(folder, None)
    yield folders
    for folder in FOLDERS:
        folder_paths.filename_list_cache.pop(folder, None)


@pytest.fixture
def no_sampling(monkeypatch):
    """Any sampling run (every training node samples first) fails the test: checks must come before compute."""
    def sampled(*args, **kwargs):
        raise AssertionError("a sampling run started")
    monkeypatch.setattr(comfy.samplers.CFGGuider, "sample", sampled)


@pytest.fixture
def typical_machine(monkeypatch):
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: FREE_MEMORY)


def writer(folder: str):
    from guidance_kit.nodes.deediff import DeeDiffTrain
    from guidance_kit.nodes.linear_ag import LinearAGCalibrate
    from guidance_kit.nodes.ppap import PPAPTrainExperts

    return {"deediff": DeeDiffTrain, "ppap": PPAPTrainExperts, "linear_ag": LinearAGCalibrate}[folder]


def tiny_inputs(folder: str, toy, filename: str, **overrides) -> dict:
    """Inputs of a training node that train in a few seconds on the toy world."""
    common = {"model": toy.model, "sampler_name": "euler", "scheduler": "simple", "seed": 0, "filename": filename}
    inputs = {
        "deediff": dict(clip=toy.clip, prompts="a red circle on the left", negative_prompt="", latent=latent(2),
                        sample_steps=4, cfg=4.0, denoise=1.0, train_steps=20, training_rows=64, batch_size=16,
                        learning_rate=3e-3, head_hidden=0),
        "ppap": dict(positive=toy.negative, negative=toy.negative, cfg=1.0, classifier=toy.classifier,
                     latent=latent(4), images=4, sample_steps=2, experts=1, steps_per_expert=2, batch_size=4,
                     learning_rate=1e-3, lora_rank=2),
        "linear_ag": dict(clip=toy.clip, prompts="a red circle\na blue square", negative_prompt="",
                          latent=latent(1), steps=4, cfg=4.0),
    }[folder]
    return {**common, **inputs, **overrides}


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def load_written(folder: str, name: str, toy):
    """The written file through its loader (PPAP's: the guidance patch that loads experts)."""
    from guidance_kit.nodes.deediff import DeeDiffLoad
    from guidance_kit.nodes.linear_ag import LinearAGLoad
    from guidance_kit.nodes.ppap import PPAPModelPatch

    if folder == "deediff":
        return run_node(DeeDiffLoad, name)[0]
    if folder == "linear_ag":
        return run_node(LinearAGLoad, name)[0]
    return run_node(PPAPModelPatch, toy.model, toy.classifier, name, "colour: red", 7.5)[0]


@pytest.mark.parametrize("folder", list(WRITERS))
def test_each_training_node_trains_through_the_executor_and_writes_its_file(toy, user_folders, folder):
    """Found: DeeDiff Train Heads never trained in the server (heads built under the executor's inference mode:
    'element 0 of tensors does not require grad'); PPAP and LinearAG through run_node too."""
    run_node(writer(folder), **tiny_inputs(folder, toy, "tiny"))
    assert files_under(user_folders[folder]) == (["tiny.safetensors"] if folder != "deediff" else
                                                 [".checkpoints", "tiny.safetensors"])
    assert load_written(folder, "tiny.safetensors", toy) is not None


def test_train_refuses_parameters_made_under_inference_mode():
    from guidance_kit.samplers import training

    settings = training.TrainSettings(steps=2, batch_size=1)
    with torch.inference_mode():
        frozen = torch.nn.Linear(3, 1)
        with pytest.raises(ValueError, match=r"^train: frozen.weight, frozen.bias are inference tensors.*"
                                             r"training.grad_mode\(\)"):
            training.train({"frozen": frozen}, lambda step, rows: frozen(torch.ones(1, 3)).sum(), settings)
        with training.grad_mode():
            trainable = torch.nn.Linear(3, 1)
        result = training.train({"lin": trainable}, lambda step, rows: trainable(torch.ones(1, 3)).sum(), settings)
    assert result.completed and result.losses[1] < result.losses[0]


OVERSIZE = {  # (folder, overrides, the input the refusal names)
    "ppap batch_size 65536": ("ppap", dict(batch_size=65536), "batch_size"),
    "ppap images 1e6": ("ppap", dict(images=1_000_000), "images"),
    "deediff training_rows 1e6": ("deediff", dict(prompts="a red circle\n" * 200, sample_steps=200,
                                                  training_rows=1_000_000), "training_rows"),
    "deediff batch_size 4096, head_hidden 4096": ("deediff", dict(batch_size=4096, head_hidden=4096), "batch_size"),
    "linear_ag latent batch 4096": ("linear_ag", dict(latent={"samples": torch.zeros(4096, 3, 32, 32)}, steps=200),
                                    "latent"),
}


@pytest.mark.parametrize("case", list(OVERSIZE))
def test_oversize_inputs_are_refused_before_compute(toy, user_folders, no_sampling, typical_machine, case):
    """Found: PPAP Train Experts at batch_size 65536 (allowed by its widget) grew the server to 23 GB until the
    kernel killed it.  With 8 GiB free every such run is refused fast, naming the node and the input."""
    folder, overrides, name = OVERSIZE[case]
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"^{re.escape(WRITERS[folder][0])}: '{name}': this run would hold about .* "
                                         r"more than "
                                         r"75% of the 8.0 GiB free; lower") as error:
        run_node(writer(folder), **tiny_inputs(folder, toy, "oversize", **overrides))
    seconds = time.monotonic() - started
    print(f"\n{case}: refused in {seconds:.2f} s: {error.value}")
    assert seconds < REFUSAL_SECONDS
    assert files_under(user_folders[folder]) == []


@pytest.mark.parametrize("folder", ["deediff", "linear_ag"])
def test_memory_is_checked_again_with_the_model_calls_the_sampler_makes(toy, user_folders, monkeypatch, folder):
    """Before compute the stored runs are estimated at one model call per step; heun makes about two, so a
    budget between the two estimates is refused after the first prompt's run, before the rest is stored."""
    from guidance_kit.nodes import deediff, linear_ag
    from guidance_kit.nodes.contract.training_guard import BUDGET_FRACTION

    inputs = tiny_inputs(folder, toy, "heun", sampler_name="heun", prompts="a red circle\na blue square\na circle")
    model, steps = toy.model, inputs.get("sample_steps", inputs.get("steps"))
    calls = 2 * steps - 1  # heun's last step is an Euler step

    def total(evaluations):
        if folder == "linear_ag":
            return sum(need.bytes for need in linear_ag.memory_needs(model, inputs["latent"],
                                                                     evaluations=evaluations))
        arch = deediff.architecture(model, "test")
        return sum(need.bytes for need in deediff.memory_needs(
            model, arch, inputs["latent"], toy.negative, runs=3, rows_per_run=evaluations * 2 * 2,
            training_rows=inputs["training_rows"], batch_size=inputs["batch_size"], hidden=0))

    budget = (total(steps) + total(calls)) / 2
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: budget / BUDGET_FRACTION)
    runs = []
    original = comfy.samplers.CFGGuider.sample
    monkeypatch.setattr(comfy.samplers.CFGGuider, "sample", lambda *a, **k: runs.append(1) or original(*a, **k))
    with pytest.raises(ValueError, match=rf"^{re.escape(WRITERS[folder][0])}: '\w+': this run would hold"):
        run_node(writer(folder), **inputs)
    assert len(runs) == 1 and files_under(user_folders[folder]) == []


BAD_NAMES = [".x", ".hidden_heads", "a\\b", "a/b", "../escape", "nul\0byte", "line\nbreak", "", "  ", ".safetensors",
             "..", "x" * 240, "\ud800"]


@pytest.mark.parametrize("folder", list(WRITERS))
def test_every_writing_node_refuses_bad_file_names_before_compute(toy, user_folders, no_sampling, folder):
    """Found: PPAP Train accepted a hidden '.x' and 'a\\b' (DeeDiff and LinearAG refused them) and failed late
    with raw OS errors (too long, NUL byte, an existing directory) after the compute; training under the shipped
    experts' name succeeded but could never be selected.  One policy now (nodes/contract/model_files.output_path):
    a name of 240 characters fits the 255-byte limit with .safetensors but not save_bundle's temporary name."""
    node, shipped = WRITERS[folder]
    (user_folders[folder] / "folder.safetensors").mkdir()
    before = files_under(user_folders[folder].parent)
    for filename in [*BAD_NAMES, "folder", shipped, shipped + ".safetensors"]:
        with pytest.raises(ValueError, match=rf"^{re.escape(node)}: 'filename'") as error:
            run_node(writer(folder), **tiny_inputs(folder, toy, filename))
        assert "Traceback" not in str(error.value) and len(str(error.value)) < 400, filename
    assert files_under(user_folders[folder].parent) == before


SHADOWED = {  # loader: (folder, listed shipped name, node name in errors)
    "LinearAG Load Calibration": ("linear_ag", "toy_dit_euler_simple_20_cfg4.safetensors", "LinearAG Load Calibration"),
    "DeeDiff Load Heads": ("deediff", "toy_dit_heads.safetensors", "DeeDiff Load Heads (Guidance Kit)"),
    "PPAP experts": ("ppap", "toy_ppap_experts.safetensors", "PPAP"),
    "Load Toy World Model": ("toyworld", "toy_dit.safetensors", "Load Toy World Model"),
    "Load Classifier": ("classifiers", "toy_classifier.safetensors (toy world)", "Load Classifier"),
}


def load_shipped(loader: str, name: str, toy):
    from guidance_kit.nodes.classifier import LoadClassifier
    from guidance_kit.nodes.deediff import DeeDiffLoad
    from guidance_kit.nodes.linear_ag import LinearAGLoad
    from guidance_kit.nodes.ppap import PPAPModelPatch
    from guidance_kit.nodes.toyworld import ToyWorldLoader

    calls = {"LinearAG Load Calibration": lambda: run_node(LinearAGLoad, name),
             "DeeDiff Load Heads": lambda: run_node(DeeDiffLoad, name),
             "PPAP experts": lambda: run_node(PPAPModelPatch, toy.model, toy.classifier, name, "colour: red",
                                              7.5),
             "Load Toy World Model": lambda: run_node(ToyWorldLoader, name),
             "Load Classifier": lambda: run_node(LoadClassifier, name, "auto")}
    return calls[loader]()


@pytest.mark.parametrize("loader", list(SHADOWED))
def test_a_user_file_under_a_shipped_name_never_replaces_the_shipped_one(toy, user_folders, loader):
    """Found: a file copied into models/linear_ag/ under the shipped calibration's name silently replaced the
    shipped one (folder_paths returns the first folder's file); models/deediff/ the same.  Every loader now
    resolves names through nodes/contract/model_files: the shipped name means the shipped file, and a user file of that
    name is refused with both paths in the message (never used in its place, never silently ignored)."""
    from guidance_kit.nodes.contract import model_files

    folder, name, node = SHADOWED[loader]
    assert load_shipped(loader, name, toy) is not None
    shipped = model_files.SHIPPED[folder][name]
    user = user_folders[folder] / name
    shutil.copyfile(shipped, user)
    folder_paths.filename_list_cache.pop(folder, None)
    assert model_files.choices(folder).count(name) == 1
    with pytest.raises(ValueError, match=rf"^{re.escape(node)}: '\w+' .*shipped with the pack") as error:
        load_shipped(loader, name, toy)
    assert str(shipped) in str(error.value) and str(user) in str(error.value)


@pytest.mark.parametrize("folder", list(WRITERS))
def test_the_largest_seed_a_widget_allows_works(toy, user_folders, folder):
    """Found: LinearAG Calibrate refused its own widget's maximum 0xffffffffffffffff with 'must be a finite number
    in [0, 1.84467e+19]' (a float comparison), and seed + i for prompt i overflowed torch's seed range in LinearAG
    and DeeDiff.  Seeds wrap modulo 2**64 (two prompts or two sampling batches here: seed + 1 wraps to 0)."""
    two_runs = {"deediff": dict(prompts="a red circle\na blue square"), "ppap": dict(images=8), "linear_ag": {}}
    run_node(writer(folder), **tiny_inputs(folder, toy, "max_seed", seed=2 ** 64 - 1, **two_runs[folder]))
    assert (user_folders[folder] / "max_seed.safetensors").is_file()
    with pytest.raises(ValueError, match=r"'seed' must be a finite number in \[0, 18446744073709551615\], got "
                                         r"18446744073709551616$"):
        run_node(writer(folder), **tiny_inputs(folder, toy, "past_max", seed=2 ** 64))


def test_the_step_probe_extrapolates_to_a_real_batch():
    """PPAP's step estimate (a probe of 1 and 2 synthetic rows) against the bytes autograd saves in a real
    256-row step of the toy classifier's student: linear in the rows, within 1%."""
    from guidance_kit.samplers import ppap, training
    from guidance_kit.samplers.classifier import toy_classifier
    from guidance_kit.toyworld import weights

    classifier = toy_classifier(weights.CLASSIFIER_WEIGHTS, "test")
    network = ppap.student_network(classifier, 4, 4.0)
    settings = ppap.ExpertTraining(experts=1, batch_size=256)
    schedule = torch.linspace(0.001, 1.0, 1000)
    heads = {head: len(names) for head, names in classifier.heads.items()}

    def coefficients(sigma):  # rectified flow
        return 1 - sigma, sigma

    def read(x, sigma):
        return x.clamp(-1, 1)

    estimate = ppap.expert_step_memory(network, classifier.prepare, read, coefficients, schedule, settings,
                                       (3, 32, 32), heads)
    pool = torch.randn(256, 3, 32, 32)
    teacher = {head: torch.randn(256, classes) for head, classes in heads.items()}
    loss = ppap.expert_loss(network, classifier.prepare, pool, teacher, read, coefficients, schedule, settings, 0)
    saved = training._saved_bytes({"student": network}, lambda rows: loss(0, slice(None)), 256)
    assert saved * training.ACTIVATION_FACTOR == pytest.approx(estimate.per_row * 256, rel=0.01)
