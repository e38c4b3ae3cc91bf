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

from harness.comfy_host import boot  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--toyworld", action="store_true", help="calibrate the pack's toy-world model")
    model.add_argument("--checkpoint", help="a ComfyUI checkpoint file (model + CLIP + VAE)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", help="text file, one prompt per line")
    prompts.add_argument("--prompt-set", choices=["dev", "validation"], help="toy-world prompt set")
    parser.add_argument("--negative", default="", help="the negative prompt")
    parser.add_argument("--images", type=int, default=2, help="images per prompt (the latent batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--tolerance", type=float, default=0.02, help="mean |pixel| difference to the CFG image (0..1)")
    parser.add_argument("--switch-steps", help="comma-separated switch steps to search (default: every step)")
    parser.add_argument("--width", type=int, default=512, help="image width (ignored for the toy world)")
    parser.add_argument("--height", type=int, default=512, help="image height (ignored for the toy world)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    boot()
    from tqdm import tqdm

    import comfy.sd
    import comfy.utils
    import nodes

    from guidance_kit.nodes import learned_ag

    if args.toyworld:
        from guidance_kit.nodes import toyworld
        from guidance_kit.toyworld import weights

        model, clip = toyworld.load_model(weights.MAIN_WEIGHTS), toyworld.load_clip(weights.MAIN_WEIGHTS)
        vae = toyworld.pixel_space_vae()
        latent = toyworld.ToyWorldEmptyLatent.execute(args.images)[0]
    else:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)
        latent = nodes.EmptyLatentImage().generate(args.width, args.height, args.images)[0]
    if args.prompts:
        texts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        from guidance_kit.toyworld import scenes

        prompt_set = scenes.dev_prompts() if args.prompt_set == "dev" else scenes.validation_prompts()
        texts = [prompt for prompt, _ in prompt_set]
    switch_steps = [int(k) for k in args.switch_steps.split(",")] if args.switch_steps else None
    encode = lambda text: nodes.CLIPTextEncode().encode(clip, text)[0]  # noqa: E731
    branches = len(switch_steps) if switch_steps else args.steps - 1
    bar = tqdm(total=len(texts) * (args.steps + branches), desc="Adaptive Guidance (learned) calibration")
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bar.update(value - bar.n))
    policy = learned_ag.calibrate(model, vae, [encode(t) for t in texts], encode(args.negative), latent,
                                  seed=args.seed, steps=args.steps, cfg=args.cfg, sampler_name=args.sampler,
                                  scheduler=args.scheduler, tolerance=args.tolerance, switch_steps=switch_steps)
    bar.close()
    policy.save(args.out)
    print(json.dumps({"out": args.out, **{k: v for k, v in policy.info.items() if k != "schedule"}}))


if __name__ == "__main__":
    main()
