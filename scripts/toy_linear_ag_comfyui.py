"""Check: LinearAG's diffusers guider with the calibration the ComfyUI nodes wrote for the toy model.

    python scripts/toy_linear_ag_comfyui.py [--prompts 16]

Runs the toy example loop (``scripts/toy_diffusers_guiders.py``'s ``denoise``: the step's latent and sigma are
shown to the guider as ``show_latents``' loop block does) with
``toyworld/calibrations/toy_dit_euler_simple_20_cfg4.safetensors`` (20 steps, cfg 4) on the first dev prompts,
one image each, and prints the mean squared distance of each configuration's final image to full CFG's (mean
and standard error over the prompts): the regression on denoised predictions as the nodes do it, the same
coefficients applied to the raw velocity (what the guider did before it was shown the latents), true CFG on
every guided step (the floor set by the conditional-only second half), and the conditional alone.  Last line
JSON.  An example check on dev prompts, not a benchmark.
"""
import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness.comfy_host import comfyui_dir  # noqa: E402

sys.path.insert(0, str(comfyui_dir() / "custom_nodes"))  # the pack as ``guidance_kit``, without booting ComfyUI
CALIBRATION = REPO / "toyworld" / "calibrations" / "toy_dit_euler_simple_20_cfg4.safetensors"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="the first N dev prompts")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from diffusers.guiders import ClassifierFreeGuidance

    from guidance_kit.diffusers_guiders import LinearAG
    from guidance_kit.samplers import linear_ag as lag
    from guidance_kit.toyworld import scenes, weights

    spec = importlib.util.spec_from_file_location("toy_diffusers_guiders",
                                                  REPO / "scripts" / "toy_diffusers_guiders.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    dit, text_encoder = weights.load_main()
    calibration = lag.Calibration.load(CALIBRATION)
    steps, cfg = calibration.evaluations, calibration.info["cfg"]
    on_raw_output = Path(tempfile.mkdtemp()) / "on_raw_output.safetensors"
    lag.Calibration(calibration.coefficients, calibration.evaluation_sigmas, calibration.schedule,
                    calibration.negative_fingerprint,
                    {**calibration.info, "prediction_space": "model_output",
                     "timesteps": [float(sigma) * 1000 for sigma in calibration.evaluation_sigmas]}).save(on_raw_output)
    configurations = {
        "cfg": lambda: ClassifierFreeGuidance(guidance_scale=cfg),
        "linear_ag_on_denoised": lambda: LinearAG(calibration=str(CALIBRATION), guidance_scale=cfg),
        "same_coefficients_on_raw_velocity": lambda: LinearAG(calibration=str(on_raw_output), guidance_scale=cfg),
        "true_cfg_every_guided_step": lambda: LinearAG(calibration=str(CALIBRATION), guidance_scale=cfg, true_every=1),
        "conditional_alone": lambda: LinearAG(calibration=str(CALIBRATION), guidance_scale=cfg, guided_until=0.0),
    }
    uncond = text_encoder(torch.tensor([scenes.tokenize("")]))
    samples = {name: [] for name in configurations}
    for index, (prompt, _) in enumerate(scenes.dev_prompts()[:args.prompts]):
        cond = text_encoder(torch.tensor([scenes.tokenize(prompt)]))
        for name, make in configurations.items():
            guider = make()
            samples[name].append(example.denoise(guider, dit, cond, uncond, steps=steps, seed=index))
            if getattr(guider, "_problem", None) is not None:
                raise RuntimeError(f"{name}: {guider._problem}")
    reference = torch.cat(samples.pop("cfg"))
    distances = {}
    for name, images in samples.items():
        squared = (torch.cat(images) - reference).pow(2).flatten(1).mean(1)
        distances[name] = {"mse_to_cfg": float(squared.mean()), "se": float(squared.std() / len(squared) ** 0.5)}
    print(json.dumps({"prompts": args.prompts, "steps": steps, "cfg": cfg, "distances": distances}))


if __name__ == "__main__":
    main()
