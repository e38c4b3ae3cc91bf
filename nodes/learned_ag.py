"""Adaptive Guidance (learned) in ComfyUI: calibrate, load and apply the switch policy of samplers/learned_ag.py.

* Calibration (``calibrate``): per prompt, one full-CFG run of the latent's batch (ComfyUI's CFGGuider,
  the chosen sampler and scheduler) recording every evaluation's features and the latent at every step;
  then, for every switch step k, the conditional alone from step k's latent on the rest of the schedule
  (a branch: the first k steps are shared, so the search costs steps·(steps + 1)/2 conditional rows per
  image instead of re-running every prefix).  Every branch's image is decoded and compared with the CFG
  image; ``earliest_safe_step`` labels each image; a logistic regression is fitted and saved to
  ``models/learned_ag/<name>.safetensors`` with metadata (model identity, model type, sampler,
  scheduler, steps, schedule, CFG, tolerance, features).  The branch equals "CFG on the first k steps,
  then the conditional alone" exactly for samplers whose state is the latent alone (euler, heun, the
  deterministic single-step samplers); for multistep or ancestral samplers the branch restarts their
  history / uses no noise, so labels are an approximation (the metadata records the sampler).
* Apply (``AdaptiveGuidanceLearned``): per evaluation, cond on the whole batch and uncond on the
  samples still guided (``CondEvaluator.skipping``, as Adaptive Guidance); each guided sample's
  features give p(safe); a sample keeps CFG at the evaluation where p ≥ ``threshold`` first holds and
  drops its unconditional afterwards.  The run record gets p per sample and a mark per switch.
* Mismatches: a policy from another model is an error when the node runs; another schedule, sampler
  or CFG scale is only known when sampling starts: a warning is logged, the run's statistics get a
  mark, and that run uses plain CFG (never a silent wrong switch).
"""
import logging
import math
import time

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..samplers import learned_ag as lag
from ..samplers.adaptive_guidance import SwitchState
from ..samplers.learned_ag import Policy
from ..samplers.training import offset_seed
from .contract import (
    Technique,
    TwinSpec,
    broadcast_to_batch,
    check_number,
    check_numeric_inputs,
    encode_prompt,
    guider_and_patch,
    guider_inputs,
    install,
    model_files,
    model_identity,
    model_input,
    node_id_of,
    record_switches,
    sampler_cfg,
    stock_cfg_run,
)
from .contract.guiders import cfg_guider
from .contract.training_guard import check_interrupt, log_work

logger = logging.getLogger(__name__)
FOLDER = "learned_ag"
NODE = "Adaptive Guidance (learned)"
CALIBRATE_NODE = "Adaptive Guidance (learned) Calibrate"
LOAD_NODE = "Adaptive Guidance (learned) Load"
CATEGORY = "Guidance Kit/acceleration"
LearnedAGPolicy = io.Custom("GUIDANCE_KIT_LEARNED_AG")
SIGMA_RTOL = 1e-4
CFG_RTOL = 1e-3
PROMPT_DIRECTIONS = 4
DEFAULT_TOLERANCE = 0.02
L2 = 1e-3


def positive_context(cond_list) -> torch.Tensor:
    """The positive's cross-attention context [B or 1, T, D] (first entry) from a processed cond list."""
    for entry in cond_list or []:
        model_conds = entry.get("model_conds", {})
        context = model_conds.get("c_crossattn")
        tensor = getattr(context, "cond", None)
        if isinstance(tensor, torch.Tensor):
            return tensor
        if isinstance(entry.get("cross_attn"), torch.Tensor):
            return entry["cross_attn"]
    raise ValueError(f"{NODE}: the positive conditioning has no cross-attention context")


def prompt_of_samples(cond_list, batch: int) -> torch.Tensor:
    """Each sample's prompt embedding [batch, D], the context broadcast to the batch as ComfyUI does."""
    return lag.prompt_embedding(broadcast_to_batch(positive_context(cond_list), batch)).cpu()


def schedule_steps(sigma: float, schedule: torch.Tensor) -> int:
    """The step an evaluation at ``sigma`` belongs to: the number of schedule sigmas above it (within rtol)."""
    return int((schedule > sigma * (1 + SIGMA_RTOL) + 1e-9).sum())


def record_outcomes(model, vae, positive, negative, latent: dict, *, seed: int, steps: int, cfg: float,
                    sampler_name: str, scheduler: str, switch_steps=None, on_step=None, keep_images=False) -> dict:
    """One prompt's calibration data: a full-CFG run recording per evaluation the features (without the
    prompt coordinates) [E, B, F], the step of each evaluation [E], the whole batch's guidance cosine [E]
    and the prompt embedding [B, D]; then the conditional alone from step k's latent for every k in
    ``switch_steps`` (default 1 … steps − 1).  Returns {"features", "steps", "batch_cosine", "prompt",
    "distances" [B, steps + 1] (decoded mean |image − CFG image| when CFG stops after k steps; +inf where
    k was not searched: k = 0, no guidance at all, is never a switch), "images" (CFG images) and with
    ``keep_images`` "branch_images" {k: images}}."""
    schedule = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    record = {"features": [], "steps": [], "batch_cosine": [], "latents": {}, "prompt": None}
    tracker = lag.FeatureTracker()
    recorder = model.clone()
    previous = recorder.model_options.get("sampler_calc_cond_batch_function")

    def calc_cond_batch(args):
        out = previous(args) if previous else comfy.samplers.calc_cond_batch(
            args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])
        sigma = float(args["sigma"].flatten()[0])
        step = schedule_steps(sigma, schedule)
        record["latents"].setdefault(step, args["input"].detach().cpu())
        if record["prompt"] is None:
            record["prompt"] = prompt_of_samples(args["conds"][0], args["input"].shape[0])
        record["features"].append(tracker.features(step / steps, out[0], out[1], cfg))
        record["steps"].append(step)
        record["batch_cosine"].append(float(lag.batch_cosine(out[0], out[1], cfg)))
        return out

    recorder.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    cfg_samples = stock_cfg_run(recorder, positive, negative, latent, seed=seed, steps=steps, cfg=cfg,
                                sampler_name=sampler_name, scheduler=scheduler, on_step=on_step)
    reference = vae.decode(cfg_samples).float().cpu()
    distances = torch.full((reference.shape[0], steps + 1), math.inf)
    distances[:, steps] = 0.0
    branch_images = {}
    sampling = model.get_model_object("model_sampling")
    sampler = comfy.samplers.sampler_object(sampler_name)
    for k in (range(1, steps) if switch_steps is None else switch_steps):
        check_interrupt()
        x = record["latents"][k]
        start = model.model.process_latent_out(sampling.inverse_noise_scaling(schedule[k], x))
        samples = cfg_guider(model, positive, negative, 1.0).sample(
            torch.zeros_like(start), start, sampler, schedule[k:], disable_pbar=True, seed=seed)
        images = vae.decode(samples).float().cpu()
        distances[:, k] = (images - reference).abs().flatten(1).mean(1)
        if keep_images:
            branch_images[k] = images
        if on_step is not None:
            on_step()
    out = {"features": torch.stack(record["features"]), "steps": torch.tensor(record["steps"]),
           "batch_cosine": torch.tensor(record["batch_cosine"]), "prompt": record["prompt"],
           "distances": distances, "images": reference}
    return {**out, "branch_images": branch_images} if keep_images else out


def collect(model, vae, positives: list, negative, latent: dict, *, seed: int, steps: int, cfg: float,
            sampler_name: str, scheduler: str, switch_steps=None, node_id=None) -> list[dict]:
    """``record_outcomes`` for each positive, noise from ``seed + index`` (progress: one tick per step of the
    CFG run and per branch)."""
    if not cfg > 1.0:
        raise ValueError(f"{CALIBRATE_NODE}: cfg must be > 1 (there is no guidance to stop), got {cfg}")
    branches = len(switch_steps) if switch_steps is not None else steps - 1
    progress = comfy.utils.ProgressBar(len(positives) * (steps + branches), node_id=node_id)
    return [record_outcomes(model, vae, positive, negative, latent, seed=offset_seed(seed, index), steps=steps,
                            cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, switch_steps=switch_steps,
                            on_step=lambda: progress.update(1))
            for index, positive in enumerate(positives)]


def training_set(records: list[dict], tolerance: float, prompt_mean, prompt_basis):
    """(features [N, F], targets [N]) over every evaluation of every recorded image's full-CFG run."""
    rows, targets = [], []
    for record in records:
        labels = lag.earliest_safe_step(record["distances"], tolerance)
        prompt = lag.project_prompts(record["prompt"], prompt_mean, prompt_basis)
        for evaluation, step in enumerate(record["steps"].tolist()):
            rows.append(torch.cat([record["features"][evaluation], prompt], dim=1))
            targets.append(lag.safe_targets(torch.full_like(labels, step), labels))
    return torch.cat(rows), torch.cat(targets)


def fit_policy(model, records: list[dict], *, steps: int, cfg: float, sampler_name: str, scheduler: str,
               tolerance: float = DEFAULT_TOLERANCE, prompt_directions: int = PROMPT_DIRECTIONS, l2: float = L2,
               seconds: float = 0.0) -> Policy:
    """The logistic policy on recorded calibration data (labels at ``tolerance``), with the metadata the
    mismatch checks read (model identity, model type, sampler, scheduler, steps, schedule, cfg)."""
    prompts = torch.cat([record["prompt"][:1] for record in records])
    prompt_mean, prompt_basis = lag.principal_directions(prompts, prompt_directions)
    features, targets = training_set(records, tolerance, prompt_mean, prompt_basis)
    start = time.perf_counter()
    weights, bias, mean, std = lag.fit_logistic(features, targets, l2=l2)
    distances = torch.cat([record["distances"] for record in records])
    labels = lag.earliest_safe_step(distances, tolerance).float()
    schedule = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    sampler = comfy.samplers.sampler_object(sampler_name)
    info = {"model": model_identity(model), "model_type": model.model.model_type.name, "sampler": sampler_name,
            "sampler_function": getattr(sampler.sampler_function, "__name__", ""), "scheduler": scheduler,
            "steps": steps, "schedule": [float(s) for s in schedule], "cfg": cfg, "tolerance": tolerance, "l2": l2,
            "features": [*lag.DYNAMIC_FEATURES, *(f"prompt_{i}" for i in range(prompt_basis.shape[0]))],
            "prompts": len(records), "images": int(labels.numel()), "mean_safe_step": round(float(labels.mean()), 3),
            "monotone_fraction": round(lag.monotone_fraction(distances, tolerance), 4),
            "calibration_seconds": round(seconds + time.perf_counter() - start, 2)}
    return Policy(weights, bias, mean, std, prompt_mean, prompt_basis, info)


def calibrate(model, vae, positives: list, negative, latent: dict, *, seed: int, steps: int, cfg: float,
              sampler_name: str, scheduler: str, tolerance: float = DEFAULT_TOLERANCE, switch_steps=None,
              node_id=None) -> Policy:
    """Record, label and fit (``collect`` then ``fit_policy``)."""
    if not positives:
        raise ValueError(f"{CALIBRATE_NODE}: 'prompts' is empty; give at least one prompt (one per line)")
    start = time.perf_counter()
    records = collect(model, vae, positives, negative, latent, seed=seed, steps=steps, cfg=cfg,
                      sampler_name=sampler_name, scheduler=scheduler, switch_steps=switch_steps, node_id=node_id)
    return fit_policy(model, records, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                      tolerance=tolerance, seconds=time.perf_counter() - start)


def mismatch(policy: Policy, sigmas: torch.Tensor, sampler, cfg: float) -> str | None:
    """Why this run cannot use the policy (another schedule, sampler or CFG scale), or None."""
    info = policy.info
    schedule = torch.tensor(info.get("schedule", []))
    if sigmas.shape != schedule.shape or not torch.allclose(sigmas.float().cpu(), schedule.float(), rtol=SIGMA_RTOL,
                                                              atol=1e-5):
        return (f"the sigma schedule ({len(sigmas) - 1} steps) differs from the calibrated one "
                f"({info.get('steps')} steps, {info.get('scheduler')})")
    function = getattr(getattr(sampler, "sampler_function", None), "__name__", None)
    if function and info.get("sampler_function") and function != info["sampler_function"]:
        return f"sampler {function} differs from the calibrated {info['sampler_function']}"
    if not math.isclose(cfg, float(info.get("cfg", math.nan)), rel_tol=CFG_RTOL):
        return f"cfg {cfg:g} differs from the calibrated {info.get('cfg')}"
    return None


class LearnedAGRun:
    """Per-run state: the switch record, the feature history, the prompt coordinates, a mismatch."""

    def __init__(self, policy: Policy, threshold: float, sigmas, sampler, cfg: float):
        self.policy = policy
        self.switch = SwitchState(threshold)
        self.tracker = lag.FeatureTracker()
        self.schedule = sigmas.float().cpu()
        self.steps = len(sigmas) - 1
        self.cfg = cfg
        self.prompt = None
        self.problem = mismatch(policy, sigmas, sampler, cfg)
        self.reported = False


class LearnedAdaptiveGuidance(Technique):
    name = "Learned AG"
    node = NODE
    uses_slot = True

    def __init__(self, policy: Policy, threshold: float):
        self.policy, self.threshold = policy, threshold

    def start_run(self, guider, sigmas, sampler):
        return LearnedAGRun(self.policy, self.threshold, sigmas, sampler, sampler_cfg(guider))

    def evaluate(self, state: LearnedAGRun, evaluator, run):
        if state.problem is not None:
            if not state.reported:
                state.reported = True
                message = f"{NODE}: {state.problem}; sampling with plain CFG (calibrate for this setting)"
                logger.warning(message)
                if run is not None:
                    run.mark(message)
            return list(evaluator(True, True))
        sigma = evaluator.sigma
        skip = state.switch.skipped(sigma, evaluator.batch)
        cond, uncond = evaluator.skipping(skip)
        if state.prompt is None:
            state.prompt = lag.project_prompts(prompt_of_samples(evaluator.cond, evaluator.batch),
                                               self.policy.prompt_mean, self.policy.prompt_basis)
        features = state.tracker.features(schedule_steps(sigma, state.schedule) / state.steps, cond, uncond, state.cfg)
        probability = self.policy.probability(torch.cat([features, state.prompt], dim=1))
        measured = ~skip
        record_switches(run, state.switch.observe(sigma, probability, measured), probability, measured, "p_safe",
                        lambda p: f"p {p:.3f} >= {self.threshold}")
        return [cond, uncond]


def patch_learned_ag(model, node_id=None, *, policy: Policy, threshold: float):
    """Clone ``model`` with learned Adaptive Guidance installed; raises if the policy is for another model."""
    if not isinstance(policy, Policy):
        raise ValueError(f"{NODE}: 'policy' must come from {CALIBRATE_NODE} or {LOAD_NODE}, got "
                         f"{type(policy).__name__}")
    check_number(NODE, "threshold", threshold, 0.0, 1.0)
    identity = model_identity(model)
    if identity != policy.info.get("model"):
        raise ValueError(f"{NODE}: the policy was calibrated on model {policy.info.get('model')}, this MODEL is "
                         f"{identity}; calibrate this model ({CALIBRATE_NODE}) first")
    return install(model, LearnedAdaptiveGuidance(policy, threshold), node_id)


class LearnedAGCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitLearnedAGCalibrate",
            display_name="Adaptive Guidance (learned) Calibrate (Guidance Kit)",
            category=CATEGORY,
            description="Labels each calibration image's earliest safe switch step (decoded image within a "
                        "tolerance of the full-CFG image) and fits the switch policy (saved to models/learned_ag/).",
            is_output_node=True,
            inputs=[
                model_input("The diffusion model to calibrate (it is not modified)."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts and the negative prompt."),
                io.Vae.Input("vae", tooltip="Decodes the calibration images the tolerance is measured on."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Calibration prompts, one per line (varied prompts like the ones you use)."),
                io.String.Input("negative_prompt", default="", multiline=True, tooltip="The negative prompt."),
                io.Latent.Input("latent", tooltip="Empty latent: its size and batch (images per prompt)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed of the first prompt (seed + i for prompt i)."),
                io.Int.Input("steps", default=20, min=2, max=200, tooltip="Sampling steps (must match at use)."),
                io.Float.Input("cfg", default=7.0, min=1.01, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale (must match at use)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="Sampler (must match at use). Labels are exact for euler/heun-like samplers."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="Scheduler (must match at use)."),
                io.Float.Input("tolerance", default=DEFAULT_TOLERANCE, min=0.0, max=1.0, step=0.001, round=0.0001,
                               tooltip="Largest mean absolute pixel difference (images in 0..1) to the full-CFG "
                                       "image that counts as 'the same image' when guidance stops early."),
                io.String.Input("filename", default="learned_ag",
                                tooltip="File name in models/learned_ag/ (.safetensors is added; overwritten)."),
            ],
            outputs=[LearnedAGPolicy.Output(display_name="policy")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts, negative_prompt, latent, seed, steps, cfg, sampler_name, scheduler,
                tolerance, filename) -> io.NodeOutput:
        check_numeric_inputs(cls, CALIBRATE_NODE, {"seed": seed, "steps": steps, "cfg": cfg, "tolerance": tolerance})
        path = model_files.output_path(FOLDER, filename, CALIBRATE_NODE)
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or not bool(torch.isfinite(samples).all()):
            raise ValueError(f"{CALIBRATE_NODE}: 'latent' must be a LATENT with a finite batch of images")
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{CALIBRATE_NODE}: 'prompts' is empty; give at least one prompt (one per line)")
        log_work(CALIBRATE_NODE, f"{len(lines)} prompts x {samples.shape[0]} images: a full-CFG run of {steps} steps "
                                 f"and {steps} conditional-only branches each, decoded")
        positives = [encode_prompt(clip, line) for line in lines]
        policy = calibrate(model, vae, positives, encode_prompt(clip, negative_prompt), latent, seed=seed, steps=steps,
                           cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, tolerance=tolerance,
                           node_id=node_id_of(cls))
        policy.save(path)
        logger.info(f"{NODE}: saved {path} ({policy.describe()})")
        return io.NodeOutput(policy)


class LearnedAGLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitLearnedAGLoad",
            display_name="Adaptive Guidance (learned) Load (Guidance Kit)",
            category=CATEGORY,
            inputs=[io.Combo.Input("policy", options=model_files.choices(FOLDER),
                                   tooltip="A file written by Adaptive Guidance (learned) Calibrate "
                                           "(models/learned_ag/).")],
            outputs=[LearnedAGPolicy.Output(display_name="policy")],
        )

    @classmethod
    def execute(cls, policy) -> io.NodeOutput:
        path = model_files.resolve(FOLDER, policy, LOAD_NODE, "policy")
        return io.NodeOutput(Policy.load(path, f"{LOAD_NODE} 'policy'"))


def _apply_inputs():
    return [LearnedAGPolicy.Input("policy", tooltip="From Adaptive Guidance (learned) Calibrate or Load."),
            io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01, round=0.001,
                           tooltip="The risk/saving trade-off: a sample stops guiding once the policy's probability "
                                   "that stopping keeps its image within the calibrated tolerance reaches this. "
                                   "Higher = safer, fewer rows saved; 1.0 = plain CFG.")]


LearnedAGGuider, LearnedAGModelPatch = guider_and_patch(TwinSpec(
    name="LearnedAG", category=CATEGORY, options=_apply_inputs, patch=patch_learned_ag,
    model_tooltip="The calibrated diffusion model (it is cloned, never modified).",
    guider_id="GuidanceKitLearnedAGGuider", guider_display="Adaptive Guidance (learned) Guider (Guidance Kit)",
    guider_description="CFG that stops evaluating the unconditional, sample by sample, when a policy calibrated on "
                       "this model predicts the image no longer changes. For SamplerCustomAdvanced.",
    guider_inputs=lambda: guider_inputs(cfg_default=7.0, cfg_tooltip="CFG scale (the calibrated one)."),
    patch_id="GuidanceKitLearnedAG", patch_display="Adaptive Guidance (learned) (Guidance Kit)",
    patch_description="MODEL patch for KSampler: stops evaluating the unconditional, sample by sample, when a policy "
                      "calibrated on this model predicts the image no longer changes.",
))

NODES = [LearnedAGCalibrate, LearnedAGLoad, LearnedAGGuider, LearnedAGModelPatch]
