"""What the calibration scripts share: the model and prompt options, loading them, and a progress bar.

``add_model_arguments`` adds the options, ``load_model`` and ``prompt_texts`` read them after
``harness.comfy_host.boot()``, ``progress_bar`` follows ComfyUI's progress hook.
"""
import argparse
from pathlib import Path


def add_model_arguments(parser: argparse.ArgumentParser, *, vae: bool) -> None:
    """The model (toy world or checkpoint), prompts, sampling settings and latent size options.

    Args:
        parser: the script's parser.
        vae: whether the script decodes images (the checkpoint's VAE is loaded).
    """
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--toyworld", action="store_true", help="calibrate the pack's toy-world model")
    model.add_argument("--checkpoint", help="a ComfyUI checkpoint file (model + CLIP" + (" + VAE)" if vae else ")"))
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", help="text file, one prompt per line")
    prompts.add_argument("--prompt-set", choices=["dev", "validation"], help="toy-world prompt set")
    parser.add_argument("--negative", default="", help="the negative prompt, the same for every prompt")
    parser.add_argument("--images", type=int, default=2, help="images per prompt (the latent batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--width", type=int, default=512, help="image width (ignored for the toy world)")
    parser.add_argument("--height", type=int, default=512, help="image height (ignored for the toy world)")


def load_model(args: argparse.Namespace, *, vae: bool) -> tuple:
    """(MODEL, CLIP, VAE or None, empty LATENT of ``args.images``) of the toy world or ``args.checkpoint``."""
    import comfy.sd
    import nodes

    if args.toyworld:
        from guidance_kit.nodes import toyworld
        from guidance_kit.toyworld import weights

        model, clip = toyworld.load_model(weights.MAIN_WEIGHTS), toyworld.load_clip(weights.MAIN_WEIGHTS)
        latent = toyworld.ToyWorldEmptyLatent.execute(args.images)[0]
        return model, clip, toyworld.pixel_space_vae() if vae else None, latent
    model, clip, image_vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=vae,
                                                                      output_clip=True)
    return model, clip, image_vae, nodes.EmptyLatentImage().generate(args.width, args.height, args.images)[0]


def prompt_texts(args: argparse.Namespace) -> list[str]:
    """The non-empty lines of ``args.prompts``, or the toy world's ``args.prompt_set``."""
    if args.prompts:
        return [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    from guidance_kit.toyworld import scenes

    prompt_set = scenes.dev_prompts() if args.prompt_set == "dev" else scenes.validation_prompts()
    return [prompt for prompt, _ in prompt_set]


def progress_bar(total: int, desc: str):
    """A tqdm bar that ComfyUI's global progress hook advances; close it when the work is done."""
    from tqdm import tqdm

    import comfy.utils

    bar = tqdm(total=total, desc=desc)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bar.update(value - bar.n))
    return bar
