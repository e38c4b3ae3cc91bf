"""Calibrate Adaptive Guidance (learned) from the command line (the same code as its Calibrate node).

Examples (from the repository root, with ComfyUI provisioned by ``make comfyui`` or COMFYUI_DIR)::

    python scripts/calibrate_learned_ag.py --toyworld --prompt-set dev --images 4 --steps 20 \
        --cfg 4 --scheduler simple --tolerance 0.01 --out toy_learned_ag.safetensors
    python scripts/calibrate_learned_ag.py --checkpoint /models/sd15.safetensors --prompts prompts.txt \
        --negative "blurry, lowres" --width 512 --height 512 --tolerance 0.02 --out sd15_euler_20.safetensors

Writes a safetensors policy (logistic weights + metadata) that the Adaptive Guidance (learned) Load node
reads from ``models/learned_ag/``, and prints its metadata as JSON.  ``--switch-steps 1,2,4,8,12``
searches only those switch steps (cheaper; labels are then rounded up to them).
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
    add_model_arguments(parser, vae=True)
    parser.add_argument("--tolerance", type=float, default=0.02, help="mean |pixel| difference to the CFG image (0..1)")
    parser.add_argument("--switch-steps", help="comma-separated switch steps to search (default: every step)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    boot()
    import nodes

    from guidance_kit.nodes import learned_ag

    model, clip, vae, latent = load_model(args, vae=True)
    texts = prompt_texts(args)
    switch_steps = [int(k) for k in args.switch_steps.split(",")] if args.switch_steps else None
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    branches = len(switch_steps) if switch_steps else args.steps - 1
    bar = progress_bar(len(texts) * (args.steps + branches), "Adaptive Guidance (learned) calibration")
    policy = learned_ag.calibrate(model, vae, [encode(t) for t in texts], encode(args.negative), latent,
                                  seed=args.seed, steps=args.steps, cfg=args.cfg, sampler_name=args.sampler,
                                  scheduler=args.scheduler, tolerance=args.tolerance, switch_steps=switch_steps)
    bar.close()
    policy.save(args.out)
    print(json.dumps({"out": args.out, **{k: v for k, v in policy.info.items() if k != "schedule"}}))


if __name__ == "__main__":
    main()
