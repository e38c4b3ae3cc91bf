"""Causality-Aware Schedule (after LINA): a SIGMAS node that spends ``share`` of a fixed step budget before a
boundary in the early, high-noise phase (samplers/lina.py holds the formula; the boundary is in the model's own
percent-of-denoising terms, so one setting means the same for eps, v and flow models)."""
import logging
import uuid
from dataclasses import dataclass

import torch

import comfy.sampler_helpers
import comfy.samplers
from comfy_api.latest import io

from ..samplers import training
from ..samplers.bundles import load_bundle
from ..samplers.lina import (
    PREDICTOR_FORMAT,
    InterventionPredictor,
    causality_aware_schedule,
    conditioning_features,
    predictor_identity,
    relation_mask,
    targeted_guidance,
)
from .contract import (
    Technique,
    TwinSpec,
    broadcast_to_batch,
    check_numeric_inputs,
    encode_prompt,
    guider_and_patch,
    guider_inputs,
    install,
    installed,
    model_files,
    model_identity,
    sampler_cfg,
)

logger = logging.getLogger(__name__)

NODE = "Causality-Aware Schedule (after LINA)"


class LINASchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitLINASchedule",
            display_name=NODE,
            category="Guidance Kit/guidance",
            description="The base scheduler's sigmas with round(share x steps) steps moved before the boundary, "
                        "where layout and relations are decided (a reconstruction after LINA, arXiv 2512.13290).",
            inputs=[
                io.Model.Input("model", tooltip="The model whose sampling (eps, v or flow) sets the sigmas."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="The base schedule; each phase keeps its spacing."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="The step budget (unchanged); one step has no room for a boundary and gives "
                                     "the base schedule."),
                io.Float.Input("share", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps spent before the boundary: round(share x steps), "
                                       "kept between 1 and steps - 1."),
                io.Float.Input("boundary", default=0.2, min=0.01, max=0.99, step=0.01,
                               tooltip="Where the early phase ends, as the fraction of the way into denoising "
                                       "(model percent: layout is fixed near 0.11 for SD3.5-Large, 0.21 for "
                                       "FLUX.2-dev, 0.14 for Qwen-Image)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="As BasicScheduler: the last denoise x the full schedule's steps."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, scheduler, steps, share, boundary, denoise) -> io.NodeOutput:
        check_numeric_inputs(cls, NODE, {"steps": steps, "share": share, "boundary": boundary, "denoise": denoise})
        if scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise ValueError(f"{NODE}: 'scheduler' must be one of {comfy.samplers.SCHEDULER_NAMES}, got {scheduler!r}")
        sampling = model.get_model_object("model_sampling")
        total_steps = steps if denoise >= 1.0 else int(steps / denoise)
        base = comfy.samplers.calculate_sigmas(sampling, scheduler, total_steps).cpu()[-(steps + 1):]
        if not bool((base[1:] < base[:-1]).all()):
            raise ValueError(f"{NODE}: 'scheduler' {scheduler!r} repeats sigmas at {steps} steps; the schedule "
                             "cannot be split into strictly decreasing phases, choose another scheduler")
        boundary_sigma = float(sampling.percent_to_sigma(boundary))
        if steps > 1 and not boundary_sigma < float(base[0]):
            raise ValueError(f"{NODE}: 'boundary' {boundary} (sigma {boundary_sigma:.4g}) lies before this "
                             f"schedule's start (sigma {float(base[0]):.4g} at denoise {denoise}); raise 'boundary' "
                             "or 'denoise'")
        return io.NodeOutput(causality_aware_schedule(base, share, boundary_sigma))



# ---------------------------------------------------------------- targeted guidance, the guiders and LINA (auto)

RELATION_NODE = "LINA Relation Prompt, after LINA"
GUIDER_NODE = "LINA Guider, after LINA"
PATCH_NODE = "LINA, after LINA"
AUTO_GUIDER_NODE = "LINA Auto Guider, after LINA"
AUTO_PATCH_NODE = "LINA Auto, after LINA"
FOLDER = "lina"
CATEGORY = "Guidance Kit/guidance"


def words_of(text: str) -> list[str]:
    return text.split()


def without_phrases(text: str, phrases: list[str]) -> str:
    """``text`` with every whole-word occurrence of each phrase removed (case-insensitive)."""
    words = words_of(text)
    lowered = [w.lower() for w in words]
    keep = [True] * len(words)
    for phrase in phrases:
        parts = phrase.lower().split()
        for start in range(len(words) - len(parts) + 1):
            if parts and lowered[start:start + len(parts)] == parts:
                keep[start:start + len(parts)] = [False] * len(parts)
    return " ".join(w for w, k in zip(words, keep) if k)


def conditioning_mean(conditioning) -> torch.Tensor:
    """The mean over tokens of a CONDITIONING's first entry [B, D] (``samplers.lina.conditioning_features``)."""
    return conditioning_features(conditioning[0][0])


def rank_words(clip, text: str) -> list[tuple[str, float]]:
    """Each word of ``text`` with its contribution through the text encoder: the distance between the mean
    conditioning of the prompt and of the prompt with that word ablated (removed), largest first."""
    words = words_of(text)
    full = conditioning_mean(encode_prompt(clip, text))
    scores = [(word, float((full - conditioning_mean(encode_prompt(clip, " ".join(words[:i] + words[i + 1:]))))
                           .norm())) for i, word in enumerate(words)]
    return sorted(scores, key=lambda pair: -pair[1])


class LINARelationPrompt(io.ComfyNode):
    """The prompt with its relation part ablated, for LINA's targeted guidance direction D(c) - D(c_abl)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitLINARelationPrompt", display_name=RELATION_NODE, category=CATEGORY,
            description="Encodes the prompt with its relation/physics words removed (given, or found through the "
                        "text encoder by ablating each word); the LINA nodes guide along prompt minus this.",
            inputs=[io.Clip.Input("clip", tooltip="The CLIP that encoded the positive prompt."),
                    io.String.Input("text", multiline=True, tooltip="The positive prompt's text."),
                    io.String.Input("words", default="", tooltip="Relation words or phrases to ablate, comma "
                                    "separated (e.g. 'left of, above'). Empty: found automatically."),
                    io.Int.Input("auto_words", default=2, min=1, max=8, tooltip="When 'words' is empty: how many "
                                 "words to ablate, those whose removal changes the mean conditioning most.")],
            outputs=[io.Conditioning.Output(display_name="ablated"), io.String.Output(display_name="removed")])

    @classmethod
    def execute(cls, clip, text, words, auto_words) -> io.NodeOutput:
        check_numeric_inputs(cls, RELATION_NODE, {"auto_words": auto_words})
        if not words_of(text):
            raise ValueError(f"{RELATION_NODE}: 'text' is empty; give the positive prompt's text")
        phrases = [p.strip() for p in words.split(",") if p.strip()]
        if not phrases:
            phrases = [word for word, _ in rank_words(clip, text)[:auto_words]]
        ablated = without_phrases(text, phrases)
        if ablated == " ".join(words_of(text)):
            raise ValueError(f"{RELATION_NODE}: 'words' {words!r}: none of them occurs in 'text' {text!r}")
        return io.NodeOutput(encode_prompt(clip, ablated), ", ".join(phrases))


@dataclass
class Intervention:
    """Per-run parameters: strengths and window per sample ([B] tensors), the schedule share."""

    prompt_strength: torch.Tensor
    latent_strength: torch.Tensor
    window_sigma: torch.Tensor
    guider: object = None
    label: str = ""
    marked: bool = False


class LINAGuidance(Technique):
    """Targeted prompt guidance and the region-restricted latent term (``samplers.lina.targeted_guidance``)
    inside a window of early steps; parameters given by hand or predicted from the positive conditioning."""

    name = "LINA"
    uses_slot = True

    def __init__(self, ablated, node: str, parameters: dict | None = None, predictor=None):
        self.ablated = ablated
        self.node = node
        self.parameters = parameters
        self.predictor = predictor
        self.conds_key = f"guidance_kit.lina.{uuid.uuid4().hex[:8]}"

    def predicted(self, positive) -> dict:
        """The predictor's parameters for each prompt of the positive conditioning (one row per batch row)."""
        cross_attn = positive[0].get("cross_attn") if positive else None
        if not isinstance(cross_attn, torch.Tensor) or cross_attn.shape[-1] != self.predictor.width:
            width = None if cross_attn is None else cross_attn.shape[-1]
            raise ValueError(f"{self.node}: 'predictor' expects conditioning of width {self.predictor.width}, the "
                             f"positive has {width}; train a predictor for this model's text encoder")
        with torch.no_grad():
            return {k: v.float().cpu() for k, v in self.predictor(conditioning_features(cross_attn).cpu()).items()}

    def start_run(self, guider, sigmas, sampler):
        ablated = comfy.sampler_helpers.convert_cond(self.ablated)
        positive = guider.conds.get("positive") or []
        width = [e["cross_attn"].shape[-1] if isinstance(e.get("cross_attn"), torch.Tensor) else None
                 for e in (positive[:1] + ablated[:1])]
        if len(width) == 2 and width[0] != width[1]:
            raise ValueError(f"{self.node}: 'ablated' has width {width[1]}, the positive has {width[0]}; encode it "
                             "with the CLIP of the sampled model")
        guider.conds[self.conds_key] = [entry.copy() for entry in ablated]
        parameters = self.predicted(positive) if self.predictor is not None else \
            {k: torch.tensor([float(v)]) for k, v in self.parameters.items()}
        sampling = guider.model_patcher.get_model_object("model_sampling")
        window_sigma = torch.tensor([float(sampling.percent_to_sigma(float(w))) if w > 0 else float("inf")
                                     for w in parameters["window"]])
        label = "LINA " + ("predicted" if self.predictor is not None else "set") + ": " + "; ".join(
            f"{name} " + ", ".join(f"{v:.3g}" for v in torch.as_tensor(values).flatten().tolist())
            for name, values in parameters.items())
        return Intervention(parameters["prompt_strength"], parameters["latent_strength"], window_sigma, guider, label)

    def evaluate(self, state: Intervention, evaluator, run):
        if evaluator.cond is None:
            return evaluator.passthrough()
        # one value per prompt row, repeated to the latent batch as ComfyUI repeats the conds
        prompt_strength, latent_strength, window_sigma = (
            broadcast_to_batch(values, evaluator.batch)
            for values in (state.prompt_strength, state.latent_strength, state.window_sigma))
        inside = (evaluator.sigma >= window_sigma) & ((prompt_strength > 0) | (latent_strength > 0))
        if not inside.any() or evaluator.uncond is None:
            cond, uncond = evaluator(True, evaluator.uncond is not None)
            return [cond, uncond]
        cond, ablated, uncond = evaluator.evaluate_lists([evaluator.cond, state.guider.conds[self.conds_key],
                                                          evaluator.uncond])
        on = inside.to(cond)
        guided, _ = targeted_guidance(cond, uncond, ablated, sampler_cfg(state.guider), prompt_strength.to(cond) * on,
                                      latent_strength.to(cond) * on)
        if run is not None:
            if not state.marked:
                run.mark(state.label)
                state.marked = True
            run.signal(prompt_strength=(prompt_strength * on.cpu()).tolist(),
                       latent_strength=(latent_strength * on.cpu()).tolist(),
                       relation_mask=relation_mask(cond, ablated).flatten(1).mean(1).tolist())
        return [guided, uncond]


class ScheduledCFGGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFGGuider that samples on the causality-aware schedule of the sigmas it is given (same step
    count, ``causality_aware_schedule``): how the LINA guiders bring the schedule to SamplerCustomAdvanced."""

    def __init__(self, model_patcher, share: float, boundary: float):
        super().__init__(model_patcher)
        self.share, self.boundary = share, boundary

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        base = sigmas.detach().cpu()
        sampling = self.model_patcher.get_model_object("model_sampling")
        boundary_sigma = float(sampling.percent_to_sigma(self.boundary))
        if base.numel() > 2 and float(base[-1]) == 0.0 and 0 < boundary_sigma < float(base[0]) \
                and bool((base[1:] < base[:-1]).all()):
            sigmas = causality_aware_schedule(base, self.share, boundary_sigma).to(sigmas)
        else:
            logger.warning("LINA guider: the sigmas (%d steps, first %.4g) cannot take the boundary %.3g; "
                           "sampling on them unchanged", base.numel() - 1, float(base[0]), self.boundary)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)


def scheduled_guider(patched, positive, negative, cfg: float, share: float, boundary: float):
    guider = ScheduledCFGGuider(patched, share, boundary)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def load_predictor(name: str, model, ablated, node: str) -> InterventionPredictor:
    """The predictor file ``name`` from models/lina/ (or shipped), checked against the sampled model and the
    conditioning width; errors name ``node`` and 'predictor'."""
    path = model_files.resolve(FOLDER, name, node, "predictor")
    width = int(ablated[0][0].shape[-1])
    metadata = load_bundle(path, PREDICTOR_FORMAT, f"{node}: 'predictor'").metadata
    hidden = int(metadata.get("identity", {}).get("hidden", 32))
    with training.grad_mode():
        predictor = InterventionPredictor(width, hidden)
    training.load_trained(path, PREDICTOR_FORMAT, f"{node}: 'predictor'", {"predictor": predictor},
                          predictor_identity(width, hidden, model_identity(model)))
    return predictor.eval().requires_grad_(False)


def manual_options() -> list:
    return [
        io.Conditioning.Input("ablated", tooltip="The prompt with its relation words ablated (LINA Relation "
                              "Prompt); the guidance direction is prompt minus this."),
        io.Float.Input("prompt_strength", default=1.0, min=0.0, max=4.0, step=0.05,
                       tooltip="s_p: adds s_p x (D(prompt) - D(ablated)) in the window."),
        io.Float.Input("latent_strength", default=0.0, min=0.0, max=4.0, step=0.05,
                       tooltip="s_l: adds s_l x M x (D(prompt) - D(uncond)), M the region the relation changes."),
        io.Float.Input("window", default=0.2, min=0.0, max=1.0, step=0.01,
                       tooltip="The terms act in the first 'window' fraction of denoising (model percent); 0: off."),
    ]


def schedule_options() -> list:
    """The manual LINA Guider's schedule: share and boundary of the causality-aware schedule."""
    return [
        io.Float.Input("share", default=0.5, min=0.0, max=1.0, step=0.01, tooltip="Fraction of the steps moved "
                       "before 'boundary' (the causality-aware schedule; the guider resamples its sigmas)."),
        io.Float.Input("boundary", default=0.2, min=0.01, max=0.99, step=0.01, tooltip="Where the early phase "
                       "ends, as the fraction of the way into denoising."),
    ]


def auto_options() -> list:
    return [io.Conditioning.Input("ablated", tooltip="The prompt with its relation words ablated (LINA Relation "
                                  "Prompt)."),
            io.Combo.Input("predictor", options=model_files.choices(FOLDER),
                           tooltip="A LINA predictor (models/lina/) trained for this model and text encoder.")]


def auto_schedule_options() -> list:
    """The LINA Auto Guider's schedule: the boundary (the share is predicted)."""
    return [io.Float.Input("boundary", default=0.2, min=0.01, max=0.99, step=0.01,
                           tooltip="Where the early phase of the predicted schedule share ends.")]


def check_ablated(ablated, node: str) -> None:
    if not ablated or not isinstance(ablated[0][0], torch.Tensor) or ablated[0][0].ndim != 3:
        raise ValueError(f"{node}: 'ablated' must be a CONDITIONING from a text encoder (LINA Relation Prompt)")


def patch_manual(model, node_id, node, ablated, prompt_strength, latent_strength, window):
    """A clone of ``model`` with LINA's guidance at the given strengths and window; errors name ``node``."""
    check_ablated(ablated, node)
    parameters = {"prompt_strength": prompt_strength, "latent_strength": latent_strength, "window": window}
    return install(model, LINAGuidance(ablated, node, parameters=parameters), node_id)


def patch_auto(model, node_id, node, ablated, predictor):
    """A clone of ``model`` with LINA's guidance, its parameters predicted by the ``predictor`` file from each
    positive conditioning; errors name ``node``."""
    check_ablated(ablated, node)
    network = load_predictor(predictor, model, ablated, node)
    return install(model, LINAGuidance(ablated, node, predictor=network), node_id)


def check_auto_guider(positive, negative, **options) -> None:
    if not positive:
        raise ValueError(f"{AUTO_GUIDER_NODE}: 'positive' is empty; the predictor reads its conditioning")


def predicted_share_guider(patched, positive, negative, cfg: float, boundary: float):
    """The scheduled guider with the share its installed predictor gives the positive conditioning."""
    network = installed(patched, LINAGuidance).predictor
    with torch.no_grad():
        share = float(network(conditioning_mean(positive).cpu())["share"].mean())
    return scheduled_guider(patched, positive, negative, cfg, share, boundary)


LINAGuider, LINAModelPatch = guider_and_patch(TwinSpec(
    name="LINA", category=CATEGORY, options=manual_options, patch=patch_manual, errors_name_the_node=True,
    guider_inputs=lambda: guider_inputs(cfg_default=4.0), guider_options=schedule_options, guider=scheduled_guider,
    guider_id="GuidanceKitLINAGuider", guider_display=GUIDER_NODE,
    guider_description="CFG + targeted prompt guidance + region-restricted latent guidance in the early window, on "
                       "the causality-aware schedule of the sigmas it is given. For SamplerCustomAdvanced.",
    patch_id="GuidanceKitLINAModelPatch", patch_display=PATCH_NODE,
    patch_description="Targeted prompt and latent guidance (after LINA) for KSampler. A MODEL patch cannot change "
                      "the sigmas: use the LINA Guider or the Causality-Aware Schedule for the schedule.",
))

LINAAutoGuider, LINAAutoModelPatch = guider_and_patch(TwinSpec(
    name="LINAAuto", category=CATEGORY, options=auto_options, patch=patch_auto, errors_name_the_node=True,
    guider_inputs=lambda: guider_inputs(cfg_default=4.0), guider_options=auto_schedule_options,
    guider=predicted_share_guider, check_guider=check_auto_guider,
    guider_id="GuidanceKitLINAAutoGuider", guider_display=AUTO_GUIDER_NODE,
    guider_description="LINA with its parameters (schedule share, strengths, window) predicted from the positive "
                       "conditioning by a trained predictor. For SamplerCustomAdvanced.",
    patch_id="GuidanceKitLINAAutoModelPatch", patch_display=AUTO_PATCH_NODE,
    patch_description="LINA's guidance with strengths and window predicted from the positive conditioning "
                      "(KSampler: the predicted schedule share needs the guider).",
))

NODES = [LINASchedule, LINARelationPrompt, LINAGuider, LINAModelPatch, LINAAutoGuider, LINAAutoModelPatch]
