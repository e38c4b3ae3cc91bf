"""Autoguidance as a diffusers guider: a real weaker model guides (``samplers/autoguidance.py``)."""
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput
from diffusers.hooks import HookRegistry, ModelHook

from ..samplers.autoguidance import autoguide
from .runs import in_window

WEAK_HOOK = "guidance_kit_autoguidance_weak_model"


class WeakModelHook(ModelHook):
    """Runs ``weak_model`` in place of the module it is registered on (same arguments)."""

    def __init__(self, weak_model: torch.nn.Module):
        super().__init__()
        self.weak_model = weak_model

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.weak_model(*args, **kwargs)


class Autoguidance(BaseGuidance):
    """Autoguidance with a weaker version of the model as the guide.

    [Guiding a Diffusion Model with a Bad Version of Itself](https://arxiv.org/abs/2406.02507) (Karras et
    al., NeurIPS 2024, Eq. 1): D = D_weak(x; c) + w·(D(x; c) − D_weak(x; c)), the weak model given the
    *same* conditioning, in place of CFG's unconditional.  Unlike diffusers' ``AutoGuidance`` (the same
    network with layers skipped), the guide here is a separate, weaker model (smaller or shorter-trained)
    with the denoiser's call signature: the guide batch runs it in place of the denoiser through a
    ``diffusers.hooks`` hook registered in ``prepare_models`` and removed in ``cleanup_models``.

    Args:
        weak_model (`torch.nn.Module`): the guide, on the denoiser's device and dtype; not part of the config
            (pass it again to ``from_config`` / ``from_pretrained``; ``new()`` keeps it).
        guidance_scale (`float`, defaults to `2.0`): w (the paper's presets use 1.7–2.9); 1.0 evaluates the
            main model alone.
        start, stop, enabled: as ``ClassifierFreeGuidance``.
    """

    _input_predictions = ["pred_cond", "pred_weak"]
    ignore_for_config = ["weak_model"]
    # Not config (objects): from_config / from_pretrained hand this keyword to __init__ through diffusers'
    # `_deprecated_kwargs` route, its one way for an init argument that is not in the config.
    _deprecated_kwargs = ["weak_model"]

    @register_to_config
    def __init__(self, weak_model: torch.nn.Module = None, guidance_scale: float = 2.0, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.weak_model = weak_model
        self.guidance_scale = guidance_scale

    def new(self, **kwargs) -> "Autoguidance":
        """A copy (``BaseGuidance.new``) that keeps this guider's weak model unless given another."""
        kwargs.setdefault("weak_model", self.weak_model)
        return super().new(**kwargs)

    def _is_guiding(self) -> bool:
        return self.guidance_scale != 1.0 and in_window(self)

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_guiding() else 1

    @property
    def is_conditional(self) -> bool:
        return True  # both batches carry the prompt's conditioning

    def _guide_batch(self) -> bool:
        return self._is_guiding() and self._count_prepared == 2

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._guide_batch():
            if self.weak_model is None:
                raise ValueError("Autoguidance: no weak_model (give the guide model to the constructor or to "
                                 "from_config(..., weak_model=...))")
            if self.weak_model is denoiser:
                raise ValueError("Autoguidance: weak_model is the denoiser itself; the guide must be a separate, "
                                 "weaker model (diffusers' AutoGuidance degrades the same network instead)")
            HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(WeakModelHook(self.weak_model),
                                                                              WEAK_HOOK)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._guide_batch():
            HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook(WEAK_HOOK, recurse=False)

    def prepare_inputs(self, data: dict) -> list:
        return [self._prepare_batch(data, 0, name) for name in self._input_predictions[:self.num_conditions]]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        return [self._prepare_batch_from_block_state(input_fields, data, 0, name)
                for name in self._input_predictions[:self.num_conditions]]

    def forward(self, pred_cond: torch.Tensor, pred_weak: torch.Tensor | None = None) -> GuiderOutput:
        pred = pred_cond if pred_weak is None else autoguide(pred_cond, pred_weak, self.guidance_scale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_weak)
