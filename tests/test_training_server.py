"""The three training nodes through the real server (session fixture ``comfy_server``): each trains with tiny
settings over HTTP and writes its file into the server's models folder, and ``/interrupt`` stops every phase
within about a second (timed from the POST to the prompt's end in ``/history``)."""
import time
import uuid

import pytest
from test_reliability_server import error_message, history_entry, interrupt, wait_until_running

from harness.comfy_host import comfyui_dir

INTERRUPT_BOUND_S = 2.0  # every phase checks ComfyUI's interrupt at least every ~0.1 s here; slack for 2 shared cores
INTO_THE_PHASE_S = 3.0  # after the prompt starts: the model is loaded and the phase under test has begun
FOLDERS = {"deediff": "models/deediff", "ppap": "models/ppap", "linear_ag": "models/linear_ag"}
TOY_CLASSIFIER = "toy_classifier.safetensors (toy world)"


def training_prompt(kind: str, filename: str, batch: int = 1, **inputs) -> dict:
    """An API prompt: the toy world model, an empty latent of ``batch`` and one training node (tiny settings,
    ``inputs`` override them)."""
    prompt = {"1": {"class_type": "GuidanceKitToyWorldLoader", "inputs": {"diffusion_model": "toy_dit.safetensors"}},
              "2": {"class_type": "GuidanceKitToyWorldEmptyLatent", "inputs": {"batch_size": batch}}}
    model, clip, latent = ["1", 0], ["1", 1], ["2", 0]
    common = {"model": model, "latent": latent, "sampler_name": "euler", "scheduler": "simple", "seed": 0,
              "filename": filename}
    if kind == "deediff":
        node = {"class_type": "GuidanceKitDeeDiffTrain", "inputs": {
            **common, "clip": clip, "prompts": "a red circle on the left", "negative_prompt": "", "sample_steps": 4,
            "cfg": 4.0, "denoise": 1.0, "train_steps": 20, "training_rows": 64, "batch_size": 16,
            "learning_rate": 3e-3, "head_hidden": 0}}
    elif kind == "ppap":
        prompt["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}}
        prompt["4"] = {"class_type": "GuidanceKitLoadClassifier", "inputs": {"classifier": TOY_CLASSIFIER,
                                                                             "pixel_source": "auto"}}
        node = {"class_type": "GuidanceKitPPAPTrainExperts", "inputs": {
            **common, "positive": ["3", 0], "negative": ["3", 0], "cfg": 1.0, "classifier": ["4", 0], "images": 4,
            "sample_steps": 2, "experts": 1, "steps_per_expert": 2, "batch_size": 4, "learning_rate": 1e-3,
            "lora_rank": 2}}
    else:
        node = {"class_type": "GuidanceKitLinearAGCalibrate", "inputs": {
            **common, "clip": clip, "prompts": "a red circle\na blue square", "negative_prompt": "", "steps": 4,
            "cfg": 4.0}}
    node["inputs"].update(inputs)
    prompt["9"] = node
    return prompt


@pytest.fixture
def output_name():
    """A file name unique to the test; whatever the server wrote under it (file, checkpoint, temporary files)
    is removed afterwards."""
    name = f"test_training_server_{uuid.uuid4().hex[:10]}"
    yield name
    for folder in FOLDERS.values():
        for path in (comfyui_dir() / folder).rglob(f"*{name}*"):
            path.unlink()


def written(kind: str, name: str) -> list[str]:
    """Files under the server's models/<kind>/ whose names contain ``name``."""
    folder = comfyui_dir() / FOLDERS[kind]
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(f"*{name}*"))


@pytest.mark.parametrize("kind", list(FOLDERS))
def test_each_training_node_writes_its_file_over_http(comfy_server, output_name, kind):
    """Found: DeeDiff Train Heads never trained in the server (the executor's inference mode); PPAP and LinearAG
    are checked the same way."""
    started = time.monotonic()
    comfy_server.run(training_prompt(kind, output_name, batch=2 if kind == "deediff" else 1))
    print(f"\n{kind}: trained over HTTP in {time.monotonic() - started:.1f} s")
    expected = [f"{output_name}.safetensors"]
    assert [name for name in written(kind, output_name) if not name.startswith(".")] == expected
    assert not [name for name in written(kind, output_name) if name.endswith(".partial")]


LONG_RUNS = {  # phase: (node, inputs that make that phase long and reach it within INTO_THE_PHASE_S)
    "ppap sampling the pool": ("ppap", dict(images=4096, sample_steps=1000)),
    "ppap training experts": ("ppap", dict(steps_per_expert=1_000_000, batch_size=64)),
    "deediff recording runs": ("deediff", dict(prompts="\n".join(["a red circle", "a blue square"] * 10),
                                               sample_steps=200)),
    "deediff training heads": ("deediff", dict(sample_steps=2, training_rows=16, train_steps=1_000_000)),
    "linear_ag calibration runs": ("linear_ag", dict(prompts="\n".join(["a red circle", "a blue square"] * 20),
                                                     steps=200)),
}


@pytest.mark.parametrize("phase", list(LONG_RUNS))
def test_interrupt_stops_every_training_phase_within_about_a_second(comfy_server, output_name, phase):
    """Found: /interrupt took 24 s to stop PPAP Train Experts (its pool was sampled without a callback).  Every
    phase now checks ComfyUI's interrupt; an interrupted run writes no file, leaves no temporary file, and
    DeeDiff keeps its resumable checkpoint."""
    kind, inputs = LONG_RUNS[phase]
    prompt_id = comfy_server.queue(training_prompt(kind, output_name, **inputs))
    wait_until_running(comfy_server)
    time.sleep(INTO_THE_PHASE_S)
    started = time.monotonic()
    interrupt(comfy_server)
    entry = history_entry(comfy_server, prompt_id)
    stopped = time.monotonic() - started
    print(f"\n/interrupt during {phase}: stopped after {stopped:.2f} s")
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in error_message(entry), \
        error_message(entry)[:2000]
    assert stopped < INTERRUPT_BOUND_S
    checkpoint = [f".checkpoints/{output_name}.safetensors"] if phase == "deediff training heads" else []
    assert written(kind, output_name) == checkpoint
