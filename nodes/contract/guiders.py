"""What the Guidance Kit guider nodes share: their standard inputs and ComfyUI's CFGGuider over a
technique's patched clone (so a guider and KSampler + the same patch are one code path)."""
import comfy.samplers
from comfy_api.latest import io

MODEL_TOOLTIP = "The diffusion model (it is cloned, never modified)."
POSITIVE_TOOLTIP = "Conditioning to steer towards."
NEGATIVE_TOOLTIP = "Conditioning to steer away from (the unconditional)."
CFG_TOOLTIP = "Classifier-free guidance scale."


def model_input(tooltip: str | None = None):
    return io.Model.Input("model", tooltip=tooltip or MODEL_TOOLTIP)


def guider_inputs(*, model_tooltip: str | None = None, positive: str = "positive",
                  positive_tooltip: str = POSITIVE_TOOLTIP, negative_tooltip: str = NEGATIVE_TOOLTIP,
                  cfg_default: float = 8.0, cfg_tooltip: str = CFG_TOOLTIP) -> list:
    """model, positive, negative, cfg: the inputs of a CFG-style guider node."""
    return [model_input(model_tooltip),
            io.Conditioning.Input(positive, tooltip=positive_tooltip),
            io.Conditioning.Input("negative", tooltip=negative_tooltip),
            io.Float.Input("cfg", default=cfg_default, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=cfg_tooltip)]


def cfg_guider(patched_model, positive, negative, cfg: float) -> comfy.samplers.CFGGuider:
    """ComfyUI's own CFGGuider over ``patched_model``."""
    guider = comfy.samplers.CFGGuider(patched_model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider
