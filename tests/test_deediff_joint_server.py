"""DeeDiff joint training through the real server (session fixture ``comfy_server``): the Train node with
``adapter_rank`` > 0 trains heads and adapters over HTTP (the executor's inference mode is where the model's
weights are inference tensors autograd refuses to save) and writes one ``guidance_kit.deediff/2`` bundle."""
from test_training_server import output_name, training_prompt, written  # noqa: F401  (output_name: a fixture)

from harness.comfy_host import comfyui_dir


def test_joint_training_writes_a_v2_bundle_over_http(comfy_server, output_name):  # noqa: F811
    comfy_server.run(training_prompt("deediff", output_name, batch=2, train_steps=4, adapter_rank=2,
                                     distill_weight=1.0))
    assert written("deediff", output_name) == [f"{output_name}.safetensors"]
    bundle = (comfyui_dir() / "models" / "deediff" / f"{output_name}.safetensors").read_bytes()
    assert b'"format":"guidance_kit.deediff/2"' in bundle[:200000].replace(b" ", b"")
