"""Guidance Kit's diffusers guiders on a tiny Modular SDXL pipeline: UNet calls, wall time, guider overhead.

The pipeline is ``harness/tiny_diffusers.py``'s (random tiny UNet, VAE, Euler scheduler; prompt embeddings
passed in; nothing downloaded).  Its components are random, so nothing here measures image quality: only
cost.  Prompts are random embeddings: the dev slice (seeds ``DEV_SEED + i``) calibrates LinearAG; every
reported figure is on the validation slice (seeds ``VALIDATION_SEED + i``), as mean ± standard error over
its prompts.

* Calls: real UNet evaluations per image (a counter on the UNet's first convolution, so a pass that
  Autoguidance hands to the weak model is not counted; the weak model has its own counter), per
  configuration, with wall time per image.  ``ag_calls_match_switch_log``: on every validation prompt,
  AG's counted calls equal what its switch log implies (two per step up to the step where the last sample
  switched, one after).
* Overhead at the no-op setting: each guider set so that it computes what a stock diffusers guider
  computes (AG at threshold 1, LinearAG with a true unconditional every step, Composable with one concept,
  each vs ClassifierFreeGuidance; Autoguidance at scale 1 vs ClassifierFreeGuidance at scale 1; GFCG with
  confidence 0, which reads its classifier every step but never adds a reference pass, vs
  ClassifierFreeGuidance, both on the pipeline built with ``show_latents``).  GFCG's classifier is a fixed
  random linear readout of the clean estimate's channel means (3 classes; references: random embeddings).
  PPAP (``td.tiny_experts``: two random convolutional experts over the latent) at scale 2; its no-op is scale 0
  vs ClassifierFreeGuidance on the ``show_latents`` pipeline.  The time
  spent inside the guider's methods (set_state, prepare_inputs, prepare_models, cleanup_models, forward) is
  timed directly in both runs of a pair; ``overhead_frac`` is the worst guider's extra guider time per step
  over the stock guider's whole step time (mean over the validation prompts), target < 2%.
  ``wall_overhead_frac`` is the paired wall-time difference of the same runs (noisier: a shared machine).

Last line: JSON.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness import tiny_diffusers as td  # noqa: E402
from harness.comfy_host import comfyui_dir  # noqa: E402

sys.path.insert(0, str(comfyui_dir() / "custom_nodes"))  # the pack as ``guidance_kit``, without booting ComfyUI

DEV_SEED, VALIDATION_SEED = 0, 1000
SCALE = 5.0
AG_THRESHOLD = 0.95
TIMED_METHODS = ("set_state", "prepare_inputs", "prepare_models", "cleanup_models", "forward")


def mean_se(values) -> dict:
    values = list(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se}


def timed(guider):
    """``guider`` with its methods timed: returns (guider, clock) where clock["seconds"] accumulates."""
    clock = {"seconds": 0.0}
    for name in TIMED_METHODS:
        method = getattr(guider, name)

        def wrapper(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                clock["seconds"] += time.perf_counter() - start
        setattr(guider, name, wrapper)
    return guider, clock


def measure(pipe, guider, inputs, steps, counters):
    """(outputs, {calls, weak_calls, seconds, guider_seconds}) of one pipeline call."""
    guider, clock = timed(guider)
    pipe.update_components(guider=guider)
    for counter in counters.values():
        counter.calls = 0
    start = time.perf_counter()
    latents = td.generate(pipe, inputs, steps)
    seconds = time.perf_counter() - start
    return latents, {"calls": counters["unet"].calls, "weak_calls": counters["weak"].calls, "seconds": seconds,
                     "guider_seconds": clock["seconds"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="validation prompts (dev: half as many)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 prompts, 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.steps = 3, 4

    import torch
    from diffusers.guiders import ClassifierFreeGuidance

    from guidance_kit.diffusers_guiders import (
        GFCG,
        PPAP,
        AdaptiveGuidance,
        Autoguidance,
        ComposableGuidance,
        LinearAG,
        calibrate_linear_ag,
    )

    pipe = td.tiny_sdxl_pipeline(seed=0)
    weak = td.tiny_unet(seed=7, width=16)
    counters = {"unet": td.CallCounter().attach(pipe.unet), "weak": td.CallCounter().attach(weak)}
    shown = td.tiny_sdxl_pipeline(seed=0, latents_to_guider=True)  # for GFCG, which reads the clean estimate
    shown_counters = {"unet": td.CallCounter().attach(shown.unet), "weak": counters["weak"]}
    readout = torch.randn(4, 3, generator=torch.Generator().manual_seed(DEV_SEED))
    references = {"colour": [None, td.concept_inputs(DEV_SEED + 1), td.concept_inputs(DEV_SEED + 2)]}

    def make_gfcg(confidence):
        return lambda: GFCG(classifier=lambda latents: {"colour": (latents.mean((2, 3)) @ readout).softmax(-1)},
                            references=references, targets={"colour": 0}, guidance_scale=SCALE,
                            confidence=confidence)
    calibration = Path(tempfile.mkdtemp()) / "tiny_sdxl_linear_ag.safetensors"
    dev = [td.prompt_inputs(DEV_SEED + i) for i in range(max(2, args.prompts // 2))]
    calibrate_linear_ag(pipe, dev, calibration, num_inference_steps=args.steps, guidance_scale=SCALE,
                        height=td.HEIGHT, width=td.WIDTH)
    concept = td.concept_inputs(DEV_SEED + 999)
    experts = td.tiny_experts(seed=DEV_SEED)

    def make_ppap(scale):
        return lambda: PPAP(experts=experts, head="colour", target=0, scale=scale, guidance_scale=SCALE)

    configurations = {
        "cfg": lambda: ClassifierFreeGuidance(guidance_scale=SCALE),
        "ag": lambda: AdaptiveGuidance(guidance_scale=SCALE, threshold=AG_THRESHOLD),
        "linear_ag": lambda: LinearAG(calibration=str(calibration), guidance_scale=SCALE),
        "composable_and_not": lambda: ComposableGuidance(weights=[SCALE, -2.0], concepts=[concept]),
        "autoguidance": lambda: Autoguidance(weak_model=weak, guidance_scale=2.0),
        "gfcg": make_gfcg(0.9),
        "ppap": make_ppap(2.0),
    }
    no_op_pairs = {  # guider at its no-op setting vs the stock guider computing the same thing
        "ag": (lambda: AdaptiveGuidance(guidance_scale=SCALE, threshold=1.0), configurations["cfg"]),
        "linear_ag": (lambda: LinearAG(calibration=str(calibration), guidance_scale=SCALE, true_every=1,
                                       guided_until=1.0), configurations["cfg"]),
        "composable": (lambda: ComposableGuidance(weights=[SCALE]), configurations["cfg"]),
        "autoguidance": (lambda: Autoguidance(weak_model=weak, guidance_scale=1.0),
                         lambda: ClassifierFreeGuidance(guidance_scale=1.0)),
        "gfcg": (make_gfcg(0.0), configurations["cfg"]),
        "ppap": (make_ppap(0.0), configurations["cfg"]),
    }
    needs_latents = {"gfcg", "ppap"}

    def on(name):
        return (shown, shown_counters) if name in needs_latents else (pipe, counters)

    validation = [td.prompt_inputs(VALIDATION_SEED + i) for i in range(args.prompts)]
    runs = {name: [] for name in configurations}
    log_matches = []
    overhead = {name: [] for name in no_op_pairs}
    wall_overhead = {name: [] for name in no_op_pairs}
    identical = {name: True for name in no_op_pairs}
    td.generate(pipe, validation[0], args.steps)  # warm-up
    td.generate(shown, validation[0], args.steps)
    for inputs in validation:
        for name, make in configurations.items():
            guider = make()
            target, target_counters = on(name)
            _, record = measure(target, guider, inputs, args.steps, target_counters)
            runs[name].append(record)
            if name == "ag":
                log_matches.append(record["calls"] == td.calls_from_switch_log(guider.switch_log, args.steps))
        for name, (make_no_op, make_stock) in no_op_pairs.items():
            target, target_counters = on(name)
            stock_latents, stock = measure(target, make_stock(), inputs, args.steps, target_counters)
            no_op_latents, no_op = measure(target, make_no_op(), inputs, args.steps, target_counters)
            identical[name] &= bool((no_op_latents - stock_latents).abs().max() <= 1e-5)
            step_seconds = stock["seconds"] / args.steps
            overhead[name].append((no_op["guider_seconds"] - stock["guider_seconds"]) / args.steps / step_seconds)
            wall_overhead[name].append(no_op["seconds"] / stock["seconds"] - 1.0)

    per_config = {name: {"unet_calls": mean_se(r["calls"] for r in records),
                         "weak_calls": mean_se(r["weak_calls"] for r in records),
                         "seconds": mean_se(r["seconds"] for r in records)} for name, records in runs.items()}
    overhead_by_guider = {name: mean_se(values) for name, values in overhead.items()}
    for name, summary in per_config.items():
        print(f"{name:20s} UNet calls/image {summary['unet_calls']['mean']:6.2f} ± {summary['unet_calls']['se']:.2f}"
              f"  weak {summary['weak_calls']['mean']:5.2f}  seconds/image {summary['seconds']['mean']:.4f} ± "
              f"{summary['seconds']['se']:.4f}")
    for name, summary in overhead_by_guider.items():
        wall = mean_se(wall_overhead[name])
        print(f"no-op {name:14s} guider overhead/step {100 * summary['mean']:+.3f}% ± {100 * summary['se']:.3f}%"
              f"  wall {100 * wall['mean']:+.2f}% ± {100 * wall['se']:.2f}%  same output as stock: {identical[name]}")
    worst = max(overhead_by_guider, key=lambda name: overhead_by_guider[name]["mean"])
    print(json.dumps({
        "steps": args.steps, "prompts": args.prompts, "quick": args.quick, "cfg_scale": SCALE,
        "ag_threshold": AG_THRESHOLD,
        "cfg_calls": per_config["cfg"]["unet_calls"]["mean"], "ag_calls": per_config["ag"]["unet_calls"]["mean"],
        "ag_calls_se": per_config["ag"]["unet_calls"]["se"], "ag_calls_match_switch_log": all(log_matches),
        "overhead_frac": overhead_by_guider[worst]["mean"], "overhead_frac_se": overhead_by_guider[worst]["se"],
        "overhead_worst_guider": worst, "overhead_frac_by_guider": overhead_by_guider,
        "wall_overhead_frac_by_guider": {name: mean_se(values) for name, values in wall_overhead.items()},
        "no_op_same_output": identical, "configurations": per_config,
    }))


if __name__ == "__main__":
    main()
