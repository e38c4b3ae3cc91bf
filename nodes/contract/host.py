"""Host recipes every technique shares: what identifies a model, the scale a sampler guides at, a text's
conditioning, and the stock full-CFG run that calibration and data-free training record from."""
import comfy.sample
import comfy.samplers

from ...samplers.bundles import fingerprint
from .guiders import cfg_guider
from .training_guard import check_interrupt


def model_identity(model) -> str:
    """What calibrations, trained heads and experts are checked against: the model class and a fingerprint of
    every diffusion-model weight (``samplers.bundles.fingerprint``; weight patches are not part of it, also while
    a patched clone of the model is loaded: its weights are read from the backup ComfyUI keeps of them)."""
    backup = getattr(model, "backup", {})
    state = {name: backup[f"diffusion_model.{name}"].weight if f"diffusion_model.{name}" in backup else value
             for name, value in model.model.diffusion_model.state_dict().items()}
    return fingerprint(state, type(model.model).__name__)


def sampler_cfg(guider) -> float:
    """The guidance scale a sampling run uses: the guider's ``cfg`` (a guider without one, e.g. BasicGuider,
    samples the conditional alone: 1)."""
    return float(getattr(guider, "cfg", 1.0))


def encode_prompt(clip, text: str):
    """``text``'s CONDITIONING, as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def stock_cfg_run(model, positive, negative, latent: dict, *, seed: int, steps: int, cfg: float, sampler_name: str,
                  scheduler: str, denoise: float = 1.0, on_step=None):
    """One sampling run of ComfyUI's own CFGGuider over ``model`` (a clone carrying the caller's recording hooks),
    as KSampler would run it: the latent's batch, noise from ``seed``, the last ``steps`` of the schedule at
    ``denoise``; ComfyUI's interrupt is checked and ``on_step()`` called every step.  Returns the samples."""
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, round(steps / denoise)).cpu()[-(steps + 1):]
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])

    def callback(*_step):
        check_interrupt()
        if on_step is not None:
            on_step()

    return cfg_guider(model, positive, negative, cfg).sample(
        comfy.sample.prepare_noise(latent_image, seed), latent_image, comfy.samplers.sampler_object(sampler_name),
        sigmas, callback=callback, disable_pbar=True, seed=seed)
