"""Train PPAP noise-range experts for a classifier on a diffusion model's own samples (data-free).

Examples (from the repository root, ComfyUI provisioned by ``make comfyui`` or COMFYUI_DIR)::

    python scripts/train_ppap.py --toyworld --out toyworld/weights/toy_ppap_experts.safetensors --work .ppap-work
    torchrun --nproc_per_node 2 scripts/train_ppap.py --toyworld --out experts.safetensors --work .ppap-work
    python scripts/train_ppap.py --checkpoint sd15.safetensors --classifier models/classifiers/mine.safetensors \\
        --vae --width 512 --height 512 --prompts prompts.txt --cfg 5 --out sd15_experts.safetensors --work work

The same code as the *PPAP Train Experts* node.  Runs on one process by default and under ``torchrun`` /
``accelerate launch`` with no change (batches split over the processes; ``--work`` must then be a shared
folder).  Resumable: the generated samples and each expert's checkpoint live in ``--work``.  Prints one JSON
line with the bundle's training facts.
"""
import os

# Spinning OpenMP threads collapse throughput on shared cores (toyworld/sample.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
    model.add_argument("--toyworld", action="store_true", help="the pack's toy-world model and classifier")
    model.add_argument("--checkpoint", help="a ComfyUI checkpoint file (model + CLIP + VAE)")
    parser.add_argument("--classifier", help="a Guidance Kit classifier bundle (default with --toyworld: the toy one)")
    parser.add_argument("--vae", action="store_true", help="the classifier reads the checkpoint's VAE decode")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: the empty prompt)")
    parser.add_argument("--negative", default="")
    parser.add_argument("--cfg", type=float, default=1.0, help="1 = unconditional generation from the prompts")
    parser.add_argument("--images", type=int, default=1024, help="clean samples generated (the distillation data)")
    parser.add_argument("--batch", type=int, default=64, help="images per sampling batch")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--experts", type=int, help="number of noise-range experts (default: ExpertTraining's)")
    parser.add_argument("--steps", type=int, help="training steps per expert")
    parser.add_argument("--train-batch", type=int, help="global training batch")
    parser.add_argument("--lr", type=float, help="AdamW learning rate")
    parser.add_argument("--rank", type=int, help="LoRA rank")
    parser.add_argument("--alpha", type=float, help="LoRA alpha")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="folder for the samples and checkpoints (resumable)")
    parser.add_argument("--out", required=True, help="output .safetensors bundle")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    boot()
    from dataclasses import replace

    from tqdm import tqdm

    import comfy.sd
    import nodes

    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.nodes.classifier import with_pixel_source
    from guidance_kit.samplers.classifier import load_classifier, toy_classifier
    from guidance_kit.samplers.ppap import ExpertTraining
    from guidance_kit.samplers.training import DistributedContext

    vae = None
    if args.toyworld:
        from guidance_kit.nodes import toyworld
        from guidance_kit.toyworld import weights

        model, clip = toyworld.load_model(weights.MAIN_WEIGHTS), toyworld.load_clip(weights.MAIN_WEIGHTS)
        latent = toyworld.ToyWorldEmptyLatent.execute(args.batch)[0]
        classifier = toy_classifier(weights.CLASSIFIER_WEIGHTS, "train_ppap --toyworld")
    else:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True)
        latent = nodes.EmptyLatentImage().generate(args.width, args.height, args.batch)[0]
    if args.classifier:
        classifier = load_classifier(args.classifier, "train_ppap --classifier")
    elif not args.toyworld:
        raise SystemExit("--classifier is required with --checkpoint")
    if args.vae:
        classifier = with_pixel_source(classifier, "vae", vae, "train_ppap --vae")
    texts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()] \
        if args.prompts else [""]
    negative = nodes.CLIPTextEncode().encode(clip, args.negative)[0]
    conditionings = [(nodes.CLIPTextEncode().encode(clip, text)[0], negative) for text in texts]
    overrides = {"experts": args.experts, "steps": args.steps, "batch_size": args.train_batch, "lr": args.lr,
                 "rank": args.rank, "alpha": args.alpha}
    settings = replace(ExpertTraining(seed=args.seed), **{k: v for k, v in overrides.items() if v is not None})
    with DistributedContext.from_environment() as context:
        bars = {}

        def on_progress(phase, done, total):
            bar = bars.get(phase) or bars.setdefault(phase, tqdm(total=total, desc=f"PPAP {phase}"))
            bar.update(done - bar.n)
            if done == total:
                bar.close()

        info = adapter.train_bundle(model, classifier, conditionings, latent, args.out, images=args.images,
                                    settings=settings, steps=args.sample_steps, cfg=args.cfg,
                                    sampler_name=args.sampler, scheduler=args.scheduler, work_dir=args.work,
                                    context=context, where="train_ppap",
                                    on_progress=on_progress if context.is_main else None)
        if context.is_main:
            print(json.dumps({"out": args.out, **info}))


if __name__ == "__main__":
    main()
