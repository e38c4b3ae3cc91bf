"""Composable Diffusion (AND / NOT of weighted prompts) as a diffusers guider (``samplers/composable.py``)."""
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..samplers.composable import check_weights, compose
from .runs import in_window

WHERE = "ComposableGuidance"


class ComposableGuidance(BaseGuidance):
    """AND / NOT of weighted prompts, one model pass per prompt plus one unconditional.

    [Compositional Visual Generation with Composable Diffusion Models](https://arxiv.org/abs/2206.01714)
    (Liu et al., Sec. 4.1, Eq. 9-10): p̂ = p(∅) + Σ_i w_i·(p(c_i) − p(∅)), a negative w_i being NOT.  The
    formula is linear, so it holds on the model's raw output (ε, v or flow velocity) as on denoised
    predictions.  Concept 0 is the pipeline's own prompt; the unconditional is its negative prompt; each
    further concept is a dict that replaces some of the denoiser's conditional inputs, named as the
    pipeline's denoise block names them (SDXL: ``prompt_embeds``, ``text_embeds`` for the pooled embedding,
    ``time_ids``).  One concept of weight s is CFG at scale s.

    Args:
        weights (`list[float]`): w_i per concept, concept 0 first (each in ±100, not all 0).
        concepts (`list[dict[str, torch.Tensor]]`): the conditional inputs of concepts 1.. (one fewer than
            ``weights``); not part of the config (pass them again to ``from_config`` / ``from_pretrained``;
            ``new()`` keeps them).
        start, stop, enabled: as ``ClassifierFreeGuidance``; outside the window only concept 0 is evaluated.
    """

    _input_predictions = ["pred_uncond", "pred_concept"]  # per instance: pred_uncond, pred_concept_0, ...
    ignore_for_config = ["concepts"]
    # Not config (objects): from_config / from_pretrained hand this keyword to __init__ through diffusers'
    # `_deprecated_kwargs` route, its one way for an init argument that is not in the config.
    _deprecated_kwargs = ["concepts"]

    @register_to_config
    def __init__(self, weights: list = (7.5,), concepts: list = None, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True):
        super().__init__(start, stop, enabled)
        weights = [float(w) for w in weights]
        check_weights(weights, WHERE)
        concepts = list(concepts or [])
        if len(concepts) != len(weights) - 1:
            raise ValueError(f"{WHERE}: {len(weights)} weights need {len(weights) - 1} concepts after the "
                             f"pipeline's prompt, got {len(concepts)}")
        if not all(isinstance(concept, dict) and concept for concept in concepts):
            raise ValueError(f"{WHERE}: each concept must be a non-empty dict of conditional inputs, e.g. "
                             "{'prompt_embeds': ..., 'text_embeds': ...}")
        self.weights, self.concepts = weights, concepts
        self._input_predictions = ["pred_uncond"] + [f"pred_concept_{k}" for k in range(len(weights))]

    def new(self, **kwargs) -> "ComposableGuidance":
        """A copy (``BaseGuidance.new``) that keeps this guider's concepts unless given others."""
        kwargs.setdefault("concepts", self.concepts)
        return super().new(**kwargs)

    def _is_guiding(self) -> bool:
        return in_window(self)

    @property
    def num_conditions(self) -> int:
        return len(self._input_predictions) if self._is_guiding() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared != 1 or not self._is_guiding()

    def _batches(self, prepare, fields) -> list:
        """``prepare(tuple_index, identifier)`` per evaluated condition, concept overrides applied; ``fields``:
        the denoiser inputs the pipeline prepares through the guider."""
        unknown = sorted({name for concept in self.concepts for name in concept} - set(fields))
        if unknown:
            raise ValueError(f"{WHERE}: concept inputs {unknown} are not inputs this pipeline's denoiser takes "
                             f"through the guider ({sorted(fields)})")
        if not self._is_guiding():
            return [prepare(0, "pred_concept_0")]
        batches = [prepare(1, "pred_uncond"), prepare(0, "pred_concept_0")]
        for k, concept in enumerate(self.concepts, start=1):
            batch = prepare(0, f"pred_concept_{k}")
            for name, value in concept.items():
                setattr(batch, name, value)
            batches.append(batch)
        return batches

    def prepare_inputs(self, data: dict) -> list:
        return self._batches(lambda index, name: self._prepare_batch(data, index, name), data)

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        return self._batches(lambda index, name: self._prepare_batch_from_block_state(input_fields, data, index, name),
                             input_fields)

    def forward(self, pred_uncond: torch.Tensor | None = None, **concepts: torch.Tensor) -> GuiderOutput:
        predictions = [concepts[f"pred_concept_{k}"] for k in range(len(concepts))]
        pred = predictions[0] if pred_uncond is None else compose(pred_uncond, predictions, self.weights)
        return GuiderOutput(pred=pred, pred_cond=predictions[0], pred_uncond=pred_uncond)
