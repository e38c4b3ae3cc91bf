"""Reliability through the real server (session fixture ``comfy_server``): bad numbers as the browser
sends them, ``/interrupt`` mid-run, and 50 workflows queued back to back.

Every workflow of workflows/ is queued as its API prompt (``harness.workflow_api``) at batch 1 and
with two calibration prompts (``light``), to keep this tier near two minutes on 2 CPU cores.
"""
import copy
import json
import math
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.comfy_host import comfyui_dir
from harness.workflow_api import ui_to_api

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("toy_*.json"))  # the real-model ones need their checkpoints
LOAD_RUNS = 50
RSS_BOUND_MB = 32  # resident memory growth allowed between the 5th and the 50th queued run
INTERRUPT_BOUND_S = 3.0  # the sampler checks for an interrupt every step (~0.1 s here); slack for 2 shared cores


def light(prompt: dict) -> dict:
    """The same workflow at batch 1, calibrating on its first two prompts."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "GuidanceKitToyWorldEmptyLatent":
            inputs["batch_size"] = 1
        if node["class_type"] == "GuidanceKitLinearAGCalibrate":
            inputs["prompts"] = "\n".join(inputs["prompts"].splitlines()[:2])
    return prompt


@pytest.fixture(scope="module")
def prompts(comfy_server):
    info = comfy_server.get("/object_info")
    return {path.stem: light(ui_to_api(json.loads(path.read_text()), info)) for path in WORKFLOWS}


def saved_images(comfy_server, entry) -> dict:
    """{(node id, index): (file name, pixels)} of the images a finished prompt saved."""
    found = {}
    for node_id, output in sorted(entry["outputs"].items()):
        for index, image in enumerate(output.get("images", [])):
            if image.get("type") == "output":
                path = comfy_server.output_dir / image["subfolder"] / image["filename"]
                found[node_id, index] = (image["filename"], np.asarray(Image.open(path)))
    return found


def server_rss_mb(comfy_server) -> float:
    status = Path(f"/proc/{comfy_server.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def history_entry(comfy_server, prompt_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = comfy_server.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.05)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")


def interrupt(comfy_server) -> None:
    """POST /interrupt (its answer has no body)."""
    request = urllib.request.Request(comfy_server.url + "/interrupt", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def error_message(entry) -> str:
    return json.dumps(entry["status"].get("messages", []))


def wait_until_running(comfy_server, timeout: float = 60.0) -> None:
    """Until the server reports a prompt running (``/queue``'s ``queue_running`` not empty)."""
    deadline = time.monotonic() + timeout
    while not comfy_server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.05)


def test_nan_and_out_of_range_numbers_sent_by_a_client(comfy_server, prompts):
    """Found: cfg NaN (valid JSON for Python's parser, and not caught by ComfyUI's min/max validation)
    gave a black image reported as success.  Out of range is ComfyUI's validation error on the input."""
    prompt = copy.deepcopy(prompts["toy_reference_cfg"])
    guider = next(k for k, n in prompt.items() if n["class_type"] == "GuidanceKitReferenceCFGGuider")
    prompt[guider]["inputs"]["cfg"] = math.nan
    entry = history_entry(comfy_server, comfy_server.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    assert "Reference CFG Guider: 'cfg' must be a finite number" in error_message(entry)
    assert not saved_images(comfy_server, entry)
    prompt[guider]["inputs"]["cfg"] = 1000.0
    with pytest.raises(RuntimeError, match=r"400.*cfg"):
        comfy_server.queue(prompt)


def calibration_leftovers(name: str) -> list[str]:
    """Files of the calibration ``name`` and temporary files in the server's models/linear_ag/."""
    folder = comfyui_dir() / "models" / "linear_ag"
    return sorted(p.name for p in folder.glob("*") if name in p.name or p.name.endswith(".partial"))


@pytest.mark.parametrize("kind", ["sampling", "calibration"])
def test_interrupt_mid_run_leaves_nothing_and_the_next_run_equals_a_fresh_one(comfy_server, prompts, kind):
    reference = prompts["toy_reference_cfg"]
    fresh = saved_images(comfy_server, comfy_server.run(reference))
    if kind == "sampling":
        long = copy.deepcopy(reference)
        scheduler = next(k for k, n in long.items() if n["class_type"] == "BasicScheduler")
        long[scheduler]["inputs"]["steps"] = 2000
    else:
        long = copy.deepcopy(prompts["toy_linear_ag"])
        calibrate = next(k for k, n in long.items() if n["class_type"] == "GuidanceKitLinearAGCalibrate")
        long[calibrate]["inputs"] |= {"steps": 200, "filename": "interrupted_calibration",
                                      "prompts": "\n".join(["a red circle", "a blue square"] * 20)}
    prompt_id = comfy_server.queue(long)
    wait_until_running(comfy_server)
    time.sleep(2.0)  # well into the run (the model is already loaded)
    started = time.monotonic()
    interrupt(comfy_server)
    entry = history_entry(comfy_server, prompt_id)
    stopped = time.monotonic() - started
    print(f"\n/interrupt during {kind}: stopped after {stopped:.2f} s")
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in error_message(entry)
    assert stopped < INTERRUPT_BOUND_S
    assert calibration_leftovers("interrupted_calibration") == []
    again = saved_images(comfy_server, comfy_server.run(reference))
    assert again.keys() == fresh.keys()
    for key, (filename, pixels) in again.items():
        assert filename != fresh[key][0], "the run after the interrupt was served from the cache"
        assert np.array_equal(pixels, fresh[key][1])


def test_fifty_workflows_queued_back_to_back(comfy_server, prompts):
    """Every workflow of workflows/ in turn (never the same twice in a row, so nothing is served from
    ComfyUI's cache), 50 queued at once: all succeed, every image equals that workflow's single run,
    and the server's RSS grows by less than RSS_BOUND_MB from the 5th run to the last."""
    names = list(prompts)
    single = {name: saved_images(comfy_server, comfy_server.run(prompts[name])) for name in names}
    sequence = [names[i % len(names)] for i in range(LOAD_RUNS)]
    started = time.monotonic()
    queued = [comfy_server.queue(prompts[name]) for name in sequence]
    filenames, rss = set(), {}
    for index, (name, prompt_id) in enumerate(zip(sequence, queued), 1):
        entry = comfy_server.wait(prompt_id, timeout=300)
        images = saved_images(comfy_server, entry)
        assert images.keys() == single[name].keys(), name
        for key, (filename, pixels) in images.items():
            assert np.array_equal(pixels, single[name][key][1]), (name, key)
            filenames.add(filename)
        if index in (5, LOAD_RUNS // 2, LOAD_RUNS):
            rss[index] = server_rss_mb(comfy_server)
    saved = sum(len(single[name]) for name in sequence)
    assert len(filenames) == saved, "some runs were served from the cache"
    growth = rss[LOAD_RUNS] - rss[5]
    print(f"\nload: {LOAD_RUNS} runs of {len(names)} workflows, {saved} images, "
          f"{time.monotonic() - started:.0f} s; server RSS after run 5: {rss[5]:.1f} MB, run {LOAD_RUNS // 2}: "
          f"{rss[LOAD_RUNS // 2]:.1f} MB, run {LOAD_RUNS}: "
          f"{rss[LOAD_RUNS]:.1f} MB (growth {growth:+.1f} MB, bound {RSS_BOUND_MB} MB)")
    assert growth < RSS_BOUND_MB
