"""Calibrate LinearAG from the command line (the same code as the LinearAG Calibrate node).

Examples (from the repository root, with ComfyUI provisioned by ``make comfyui`` or COMFYUI_DIR)::

    python scripts/calibrate_linear_ag.py --toyworld --prompt-set dev --images 4 --steps 20 \
        --cfg 4 --scheduler simple --out toy_linear_ag.safetensors
    python scripts/calibrate_linear_ag.py --checkpoint /models/sd15.safetensors --prompts prompts.txt \
        --negative "blurry, lowres" --width 512 --height 512 --out sd15_euler_20.safetensors

Writes a safetensors file (coefficients + metadata) that the LinearAG Load node reads from
``models/linear_ag/``.  ``--holdout N`` keeps the last N prompts out of the fit and prints the
regression's error against reusing the previous step's unconditional on them.
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from _model_cli import add_model_arguments, load_model, progress_bar, prompt_texts  # noqa: E402

from harness.comfy_host import boot  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser, vae=False)
    parser.add_argument("--holdout", type=int, default=0, help="prompts kept out of the fit to measure it")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    boot()
    import nodes

    from guidance_kit.nodes import linear_ag
    from guidance_kit.samplers.linear_ag import heldout_errors

    model, clip, _, latent = load_model(args, vae=False)
    texts = prompt_texts(args)
    if args.holdout >= len(texts):
        raise SystemExit(f"--holdout {args.holdout} leaves no prompt to fit ({len(texts)} prompts)")
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    fit_texts, held_texts = texts[:len(texts) - args.holdout], texts[len(texts) - args.holdout:]
    negative = encode(args.negative)

    bar = progress_bar(len(fit_texts) * args.steps, "LinearAG calibration")
    calibration = linear_ag.calibrate(model, [encode(t) for t in fit_texts], negative, latent, seed=args.seed,
                                      steps=args.steps, cfg=args.cfg, sampler_name=args.sampler,
                                      scheduler=args.scheduler, negative_prompt=args.negative)
    bar.close()
    calibration.save(args.out)
    report = {"out": args.out, **calibration.info}
    if held_texts:
        totals = {}
        for xs, conds, unconds, _, _ in linear_ag.full_cfg_trajectories(
                model, [encode(t) for t in held_texts], negative, latent, seed=args.seed + len(fit_texts),
                steps=args.steps, cfg=args.cfg, sampler_name=args.sampler, scheduler=args.scheduler):
            for name, value in heldout_errors(calibration.coefficients, calibration.terms, xs, conds, unconds).items():
                totals[name] = totals.get(name, 0.0) + value
        report["heldout_mse"] = {name: value / len(held_texts) for name, value in totals.items()}
        report["heldout_ratio_vs_previous_uncond"] = totals["regression"] / totals["previous_uncond"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
