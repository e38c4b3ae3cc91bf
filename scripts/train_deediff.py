"""Train DeeDiff for a model, data-free (the same code as the DeeDiff Train Heads node): the uncertainty heads alone,
or, with ``--rank R``, jointly with rank-R adapters on every block's attention and MLP projections (a
``guidance_kit.deediff/2`` bundle).

One process (GPU if there is one, else CPU) by default; several under ``torchrun`` or ``accelerate launch`` with no
change: every process records the same sampling runs, each takes its slice of every global batch, gradients are
averaged (``samplers/training.py``), and the main process writes OUT.

    python scripts/train_deediff.py OUT                                # the toy world model, its training prompts
    python scripts/train_deediff.py OUT --ckpt model.safetensors --prompts prompts.txt --cfg 5
    torchrun --nproc_per_node 2 scripts/train_deediff.py OUT --steps 100
    python scripts/train_deediff.py OUT --rank 4 --distill 1 --steps 600    # joint training

``--checkpoint PATH`` resumes an interrupted run of the same settings (written every steps/10 steps).
"""
import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness.comfy_host import comfyui_dir  # noqa: E402


def boot(cpu: bool) -> None:
    """Import ComfyUI (on the CPU when asked or when there is no GPU) with the pack importable as guidance_kit."""
    path = comfyui_dir()
    for entry in (str(path / "custom_nodes"), str(path)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    from comfy.cli_args import args

    args.cpu = cpu or not torch.cuda.is_available()
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)


def load(ckpt: str | None):
    """(MODEL, CLIP, prompts default) of a ComfyUI checkpoint, or of the toy world."""
    if ckpt:
        import comfy.sd

        model, clip = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=True)[:2]
        return model, clip, None
    from guidance_kit.nodes import toyworld as adapter
    from guidance_kit.toyworld import scenes, weights

    return (adapter.load_model(weights.MAIN_WEIGHTS), adapter.load_clip(weights.MAIN_WEIGHTS),
            [prompt for prompt, _ in scenes.training_prompts()])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the heads bundle to write (.safetensors)")
    parser.add_argument("--ckpt", help="a ComfyUI checkpoint with its text encoder (default: the toy world model)")
    parser.add_argument("--prompts", help="a text file, one prompt per line (default: the toy world's training "
                                          "prompts, disjoint from its dev and validation sets)")
    parser.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    parser.add_argument("--every", type=int, default=1, help="use every n-th prompt (before --max-prompts)")
    parser.add_argument("--negative", default="")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="image size in pixels for --ckpt models (latent / 8)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple")
    parser.add_argument("--rows", type=int, default=2048, help="recorded model rows kept for training")
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[0],
                        help="head hidden width (0: the paper's linear head); several values train one set of heads "
                             "each on the same recording, written to OUT with '-hidden<width>' before the suffix")
    parser.add_argument("--rank", type=int, default=0, help="adapter rank of joint training (0: heads only)")
    parser.add_argument("--alpha", type=float, default=0.0, help="adapter scale numerator (default: the rank)")
    parser.add_argument("--distill", type=float, default=1.0, help="weight of the self-distillation term (joint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", help="resumable training checkpoint")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    args = parser.parse_args(argv)
    boot(args.cpu)
    from tqdm import tqdm

    from guidance_kit.nodes import deediff as adapter
    from guidance_kit.nodes.contract import encode_prompt
    from guidance_kit.samplers import training

    model, clip, default_prompts = load(args.ckpt)
    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else default_prompts
    prompts = [line.strip() for line in prompts if line.strip()][::args.every][:args.max_prompts or None]
    if not prompts:
        parser.error("no prompts (give --prompts FILE with one prompt per line)")
    if args.ckpt:
        import comfy.sample

        channels = model.get_model_object("latent_format").latent_channels
        latent = {"samples": torch.zeros(args.images_per_prompt, channels, args.size // 8, args.size // 8)}
        latent["samples"] = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    else:
        from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

        latent = ToyWorldEmptyLatent.execute(args.images_per_prompt)[0]
    settings = training.TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    with training.DistributedContext.from_environment("cpu" if args.cpu else None) as context:
        bar = tqdm(total=len(prompts) * args.sample_steps, desc="recording runs", disable=not context.is_main)
        recording = adapter.record_model_inputs(
            model, [encode_prompt(clip, p) for p in prompts], encode_prompt(clip, args.negative), latent,
            seed=args.seed, steps=args.sample_steps, cfg=args.cfg, sampler_name=args.sampler,
            scheduler=args.scheduler, on_step=lambda: bar.update(1))
        bar.close()
        arch = adapter.architecture(model, "train_deediff")
        bar = tqdm(total=min(args.rows, len(recording)), desc="frozen outputs" if args.rank else "block outputs",
                   disable=not context.is_main)
        features = (adapter.joint_data if args.rank else adapter.exit_features)(model, arch, recording, args.rows,
                                                                                 on_chunk=bar.update)
        bar.close()

        def on_step(step, total, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4g}")
            bar.refresh()

        data = {"prompts": len(prompts), "prompts_fingerprint": adapter.prompts_fingerprint(prompts, args.negative),
                "images": len(prompts) * args.images_per_prompt, "rows": args.rows,
                "sampler": args.sampler,
                "scheduler": args.scheduler, "sample_steps": args.sample_steps, "cfg": args.cfg, "denoise": 1.0,
                "negative_prompt": args.negative}
        for hidden in args.hidden:
            out = Path(args.out)
            if len(args.hidden) > 1:
                out = out.with_name(f"{out.stem}-hidden{hidden}{out.suffix}")
            checkpoint = args.checkpoint and Path(args.checkpoint).with_name(f"{Path(args.checkpoint).stem}-{hidden}"
                                                                             f"{Path(args.checkpoint).suffix}")
            bar = tqdm(total=args.steps, desc=f"training {'jointly' if args.rank else 'heads'} (hidden {hidden})",
                       disable=not context.is_main)
            if args.rank:
                _, result = adapter.train_joint(model, features, settings, out, rank=args.rank,
                                                alpha=args.alpha or float(args.rank), distill_weight=args.distill,
                                                hidden=hidden, info=data, checkpoint=checkpoint, context=context,
                                                on_step=on_step, where="train_deediff")
            else:
                _, result = adapter.train_heads(model, features, settings, out, hidden=hidden, data=data,
                                                checkpoint=checkpoint, context=context, on_step=on_step,
                                                where="train_deediff")
            bar.close()
            if context.is_main:
                print(f"{out}: {result.step} steps on {len(features)} of {len(recording)} recorded rows, "
                      f"{context.world_size} process(es), loss {result.losses[0]:.4g} -> {result.final_loss:.4g}")


if __name__ == "__main__":
    main()
