"""Gradient-free classifier guidance (GFCG) as a diffusers guider (``samplers/gfcg.py``)."""
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from ..samplers import gfcg
from .latents import SeesLatents
from .runs import FreshEachRun

WHERE = "GFCG (diffusers)"


class GFCG(SeesLatents, FreshEachRun, ClassifierFreeGuidance):
    """CFG plus a per-sample push away from the class a classifier reads in the sample's clean estimate.

    [Gradient-Free Classifier Guidance](https://arxiv.org/abs/2411.15393) (rules as ``samplers/gfcg.py``, the
    nodes' ``reference_row="extra"``): at each step inside the window (σ ≤ ``start_sigma``, a reading every
    ``every`` steps), ``classifier`` reads the previous step's guided clean estimate x̂₀; per sample the most
    confused head h gives the reference class r and the scale w = w_max·ρ (0 once p(target) ≥ ``confidence``);
    for a batch with any w > 0 a third pass evaluates each sample under its reference conditioning (the prompt
    with the target's phrase replaced by r's), and the output is CFG + w·(p(c) − p(c_ref)).  That sum is linear,
    so it is the nodes' formula on x̂₀ as on the raw output.  Needs each step's latent and σ: build the pipeline
    with ``show_latents``.  ``reading_log`` lists each classifier reading of the current run (step, w per
    sample, the (head, class) of each sample's reference pass or None).

    Args:
        classifier (`Callable[[torch.Tensor], dict[str, torch.Tensor]]`): clean estimates (the pipeline's
            latents, e.g. decoded by the VAE inside the callable) to per-head class probabilities {head: [B, K]};
            not part of the config.
        references (`dict[str, list]`): per head, per class, the conditional inputs of the prompt naming that
            class (as the denoise block names them, SDXL: ``prompt_embeds``, ``text_embeds``; batch 1), ``None``
            at the target; not part of the config.
        targets (`dict[str, int]`): per head, the target class index.
        guidance_scale (`float`, defaults to `7.5`): CFG scale.
        max_scale (`float`, defaults to `2.0`): w_max.
        confidence (`float`, defaults to `0.9`): no reference pass for a sample whose target probability
            reaches this.
        start_sigma (`float`, optional): GFCG acts at σ ≤ this (the scheduler's σ; `None`: everywhere).
        every (`int`, defaults to `1`): read the classifier every this many steps in the window.
        guidance_rescale, use_original_formulation, start, stop, enabled: as ``ClassifierFreeGuidance``.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_reference"]
    ignore_for_config = ["classifier", "references"]
    # Not config (objects): from_config / from_pretrained hand these keywords to __init__ through diffusers'
    # `_deprecated_kwargs` route, its one way for an init argument that is not in the config.
    _deprecated_kwargs = ["classifier", "references"]

    @register_to_config
    def __init__(self, classifier=None, references: dict = None, targets: dict = None, guidance_scale: float = 7.5,
                 max_scale: float = 2.0, confidence: float = 0.9, start_sigma: float = None, every: int = 1,
                 guidance_rescale: float = 0.0, use_original_formulation: bool = False, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         use_original_formulation=use_original_formulation, start=start, stop=stop, enabled=enabled)
        targets, references = dict(targets or {}), dict(references or {})
        if not callable(classifier):
            raise ValueError(f"{WHERE}: 'classifier' must be a callable from clean estimates to {{head: "
                             "probabilities}}")
        if not targets or set(references) != set(targets):
            raise ValueError(f"{WHERE}: 'targets' and 'references' need the same heads, at least one; got "
                             f"{sorted(targets)} and {sorted(references)}")
        for head, classes in references.items():
            if not 0 <= targets[head] < len(classes):
                raise ValueError(f"{WHERE}: target {targets[head]} of head {head!r} is not one of its "
                                 f"{len(classes)} reference classes")
        if every < 1 or not 0.0 <= confidence <= 1.0 or max_scale < 0:
            raise ValueError(f"{WHERE}: need every >= 1, confidence in [0, 1], max_scale >= 0; got {every}, "
                             f"{confidence}, {max_scale}")
        self.classifier, self.references, self.targets = classifier, references, targets
        self.max_scale, self.confidence, self.every = max_scale, confidence, every
        self.start_sigma = float("inf") if start_sigma is None else start_sigma
        self.start_run()

    def new(self, **kwargs) -> "GFCG":
        """A copy (``BaseGuidance.new``) that keeps this guider's classifier and references unless given others."""
        kwargs.setdefault("classifier", self.classifier)
        kwargs.setdefault("references", self.references)
        return super().new(**kwargs)

    def start_run(self) -> None:
        self._schedule = gfcg.ReadingSchedule(self.every, self.start_sigma)
        self._previous_denoised = None
        self._reference = None
        self.reading_log: list[dict] = []

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if self._sample is None:
            self.take_sample(WHERE)  # raises: the pipeline shows no latents
        self._reference = self._read(self._sample.sigma)

    def _read(self, sigma: float) -> gfcg.Reference | None:
        """The reference for this step (``samplers.gfcg``: a fresh reading when due, else the last one)."""
        previous = self._previous_denoised
        if previous is None or not self._is_cfg_enabled() or not self._schedule.acts(sigma):
            return None
        if not self._schedule.due():
            return self._schedule.last
        probabilities = self.classifier(previous)
        reference = gfcg.choose_reference(probabilities, self.targets, self.max_scale, self.confidence)
        self._schedule.last = reference
        heads = list(self.targets)
        self.reading_log.append({"step": self._step, "scale": reference.scale.tolist(),
                                 "reference": [(heads[h], int(k)) if active else None
                                               for h, k, active in zip(reference.head, reference.index,
                                                                       reference.active)]})
        return reference

    def _references_evaluated(self) -> bool:
        return self._reference is not None and bool(self._reference.active.any())

    @property
    def num_conditions(self) -> int:
        return super().num_conditions + (1 if self._references_evaluated() else 0)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared != 2

    def _reference_batch(self, batch):
        """``batch`` (the conditional inputs) with each active sample's rows replaced by its reference
        conditioning."""
        heads, reference, replaced = list(self.targets), self._reference, {}
        for i in reference.active.nonzero().flatten().tolist():
            inputs = self.references[heads[int(reference.head[i])]][int(reference.index[i])]
            for name, value in inputs.items():
                if name not in replaced:
                    rows = getattr(batch, name, None)
                    if rows is None:
                        raise ValueError(f"{WHERE}: reference input {name!r} is not an input this pipeline's "
                                         "denoiser takes through the guider")
                    replaced[name] = rows.clone()
                replaced[name][i] = value[0].to(replaced[name])
        for name, rows in replaced.items():
            setattr(batch, name, rows)
        return batch

    def prepare_inputs(self, data: dict) -> list:
        batches = super().prepare_inputs(data)
        if self._references_evaluated():
            batches.append(self._reference_batch(self._prepare_batch(data, 0, "pred_reference")))
        return batches

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        batches = super().prepare_inputs_from_block_state(data, input_fields)
        if self._references_evaluated():
            batches.append(self._reference_batch(
                self._prepare_batch_from_block_state(input_fields, data, 0, "pred_reference")))
        return batches

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None,
                pred_reference: torch.Tensor | None = None) -> GuiderOutput:
        output = super().forward(pred_cond, pred_uncond)
        if pred_reference is not None:
            scale = self._reference.scale.to(pred_cond.device)
            output = GuiderOutput(pred=gfcg.guide(output.pred, pred_cond, pred_reference, scale),
                                  pred_cond=pred_cond, pred_uncond=pred_uncond)
        self._previous_denoised = self.take_sample(WHERE).denoised(output.pred)
        return output
