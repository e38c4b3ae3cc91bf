"""LinearAG in ComfyUI: calibrate, load, and apply (GUIDER and MODEL patch) the regression of
samplers/linear_ag.py.

* Calibration runs full-CFG trajectories of the given MODEL (stock CFGGuider, the chosen sampler
  and scheduler) over a prompt list x the latent's batch, records every evaluation's latent and
  conditional/unconditional predictions, fits the per-(anchor, target) coefficients by least
  squares and saves them to ``models/linear_ag/<name>.safetensors`` with metadata: model identity
  (class + a hash of four weight tensors; LoRA/weight patches are not part of it), model type,
  sampler, scheduler, steps, the exact sigma schedule, CFG scale, negative prompt (text and a
  fingerprint of its conditioning).
* The apply forms install through the technique contract (``contract.install``): per run, the
  evaluations follow ``step_pattern`` (true CFG / regressed / conditional only).
* Mismatches: a calibration from another model is an error when the node runs.  A different
  schedule (steps, scheduler, denoise, model sampling shift), sampler, latent channel count or
  negative prompt is only known when sampling starts: a warning is logged, the run's statistics
  get a mark, and that run uses true CFG throughout (never silently regressed garbage).
"""
import logging
import math

import torch

import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..samplers import linear_ag as lag
from ..samplers.linear_ag import Calibration
from ..samplers.training import offset_seed
from .contract import (
    Technique,
    TwinSpec,
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
    sampler_cfg,
    stock_cfg_run,
)
from .contract.training_guard import Need, check_interrupt, check_memory, log_work, size, tensor_bytes

logger = logging.getLogger(__name__)
FOLDER = "linear_ag"
SIGMA_RTOL = 1e-4
LinearAGCalibration = io.Custom("GUIDANCE_KIT_LINEAR_AG")
CALIBRATED_MODEL_TOOLTIP = "The calibrated diffusion model (it is cloned, never modified)."
CATEGORY = "Guidance Kit/acceleration"
NODE = "LinearAG"
CALIBRATE_NODE = "LinearAG Calibrate"
LOAD_NODE = "LinearAG Load Calibration"
CFG_RTOL = 1e-3


def negative_fingerprint(cond_list) -> torch.Tensor:
    """``linear_ag.conditioning_fingerprint`` of the negative's cross-attention conditioning."""
    return lag.conditioning_fingerprint([entry["cross_attn"] for entry in cond_list or [] if "cross_attn" in entry])


def full_cfg_trajectories(model, positives: list, negative, latent: dict, *, seed: int, steps: int, cfg: float,
                          sampler_name: str, scheduler: str, on_step=None):
    """For each positive CONDITIONING, a full-CFG run (``stock_cfg_run``) of the latent's batch, noise from
    ``seed + index`` (modulo 2**64); yields (xs, conds, unconds, evaluation_sigmas, samples) per prompt."""
    if not cfg > 1.0:
        raise ValueError(f"LinearAG calibration: cfg must be > 1 (the unconditional is what is fitted), got {cfg}")
    for index, positive in enumerate(positives):
        record = {"x": [], "cond": [], "uncond": [], "sigma": []}
        recorder = model.clone()
        previous = recorder.model_options.get("sampler_calc_cond_batch_function")

        def calc_cond_batch(args, record=record, previous=previous):
            out = previous(args) if previous else comfy.samplers.calc_cond_batch(
                args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])
            record["x"].append(args["input"].detach().cpu())
            record["cond"].append(out[0].detach().cpu())
            record["uncond"].append(out[1].detach().cpu())
            record["sigma"].append(float(args["sigma"].flatten()[0]))
            return out

        recorder.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
        samples = stock_cfg_run(recorder, positive, negative, latent, seed=offset_seed(seed, index), steps=steps,
                                cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, on_step=on_step)
        yield record["x"], record["cond"], record["uncond"], torch.tensor(record["sigma"]), samples


def memory_needs(model, latent: dict, *, evaluations: int, terms=lag.TERMS) -> list[Need]:
    """What a calibration holds at its peak (``training_guard``): one prompt's trajectories (x, D_c, D_u per
    evaluation) with one regression's design matrices (float64), and the least-squares sums of every
    (anchor, target) pair with the copies the solve makes."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    batch, channels = samples.shape[:2]
    image = tensor_bytes(samples.shape[1:])
    k = len(terms)
    return [
        Need("latent", f"one prompt's trajectories of {evaluations} evaluations x {batch} images "
                       f"({size(image)} each) and a regression's design matrices",
             (3 * evaluations + 1) * batch * image + 2 * 2 * batch * image * k),
        Need("steps", f"the least-squares sums of {evaluations} x {evaluations} evaluation pairs",
             3 * tensor_bytes([evaluations, evaluations, channels, k * k + k], torch.float64)),
    ]


def calibrate(model, positives: list, negative, latent: dict, *, seed: int, steps: int, cfg: float, sampler_name: str,
              scheduler: str, negative_prompt: str = "", terms=lag.TERMS, node_id=None,
              after_first_run=None) -> Calibration:
    """Fit LinearAG's coefficients on full-CFG trajectories (progress bar: one tick per step; ComfyUI's
    interrupt checked every step and every target of the fit).  ``after_first_run(evaluations)``: called with
    the first run's evaluation count before the fit is allocated (e.g. to check memory again)."""
    if not positives:
        raise ValueError("LinearAG calibration: prompts is empty; give at least one prompt (one per line)")
    progress = comfy.utils.ProgressBar(len(positives) * steps, node_id=node_id)
    fit, evaluation_sigmas = None, None
    for xs, conds, unconds, sigmas, _ in full_cfg_trajectories(
            model, positives, negative, latent, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
            scheduler=scheduler, on_step=lambda: progress.update(1)):
        if fit is None:
            if after_first_run is not None:
                after_first_run(len(xs))
            fit, evaluation_sigmas = lag.LeastSquaresFit(len(xs), xs[0].shape[1], terms), sigmas
        fit.add_trajectory(xs, conds, unconds, on_target=check_interrupt)
    schedule = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    sampler = comfy.samplers.sampler_object(sampler_name)
    info = {"model": model_identity(model), "model_type": model.model.model_type.name, "sampler": sampler_name,
            "sampler_function": getattr(sampler.sampler_function, "__name__", ""), "scheduler": scheduler,
            "steps": steps, "cfg": cfg, "negative_prompt": negative_prompt, "prompts": len(positives),
            "images": len(positives) * int(latent["samples"].shape[0]), "terms": list(fit.terms),
            "latent_shape": list(latent["samples"].shape[1:])}
    return Calibration(fit.solve(), evaluation_sigmas, schedule,
                       negative_fingerprint(comfy.sampler_helpers.convert_cond(negative)), info)


def cfg_mismatch(calibration: Calibration, cfg: float | None) -> str | None:
    """A warning when sampling at another CFG scale than the calibration's (it still applies: the
    regression is per trajectory, but was fitted on trajectories of the calibrated scale)."""
    calibrated = calibration.info.get("cfg")
    if cfg is None or not isinstance(calibrated, (int, float)) or math.isclose(cfg, calibrated, rel_tol=CFG_RTOL):
        return None
    return (f"LinearAG: sampling at cfg {cfg:g} with a calibration made at cfg {calibrated:g}; the regression was "
            "fitted on other trajectories (calibrate at this cfg for the calibrated accuracy)")


class LinearAGRun:
    """Per-run state: the pattern, the current anchor, and the first mismatch found (if any)."""

    def __init__(self, calibration: Calibration, pattern: list[str], sigmas, sampler, cfg: float | None = None):
        self.calibration = calibration
        self.pattern = pattern
        self.evaluation = 0
        self.anchor = None     # {"index", "x", "cond", "uncond"} of the last true-CFG evaluation
        self.previous = None   # {"x", "cond"} of the previous evaluation
        self.problem = None
        self.reported = False
        self.cfg_notice = cfg_mismatch(calibration, cfg)
        schedule = calibration.schedule
        function = getattr(getattr(sampler, "sampler_function", None), "__name__", None)
        if sigmas.shape != schedule.shape or not torch.allclose(sigmas.float().cpu(), schedule, rtol=SIGMA_RTOL,
                                                                  atol=1e-6):
            self.problem = (f"the sigma schedule ({len(sigmas) - 1} steps) differs from the calibrated one "
                            f"({calibration.info.get('steps')} steps, {calibration.info.get('scheduler')})")
        elif function and calibration.info.get("sampler_function") and function != calibration.info["sampler_function"]:
            self.problem = f"sampler {function} differs from the calibrated {calibration.info['sampler_function']}"

    def check(self, evaluator) -> None:
        """Detect mismatches visible only at an evaluation (first one: negative, channels; each: sigma)."""
        calibration = self.calibration
        j = self.evaluation
        if self.problem is None and j == 0:
            if evaluator.x.shape[1] != calibration.coefficients.shape[2]:
                self.problem = (f"latent has {evaluator.x.shape[1]} channels, calibrated "
                                f"{calibration.coefficients.shape[2]}")
            elif not lag.fingerprints_match(negative_fingerprint(evaluator.uncond), calibration.negative_fingerprint):
                negative = calibration.info.get('negative_prompt')
                self.problem = f"negative prompt differs from the calibrated {negative!r}"
        if self.problem is None:
            if j >= calibration.evaluations:
                self.problem = f"more evaluations than the {calibration.evaluations} calibrated"
            elif abs(evaluator.sigma - float(calibration.evaluation_sigmas[j])) > \
                    SIGMA_RTOL * abs(float(calibration.evaluation_sigmas[j])) + 1e-6:
                self.problem = (f"evaluation {j} at sigma {evaluator.sigma:.5g}, calibrated at "
                                f"{float(calibration.evaluation_sigmas[j]):.5g}")


class LinearAG(Technique):
    name = "LinearAG"
    node = NODE
    uses_slot = True

    def __init__(self, calibration: Calibration, true_every: int, guided_until: float):
        self.calibration, self.true_every, self.guided_until = calibration, true_every, guided_until

    def start_run(self, guider, sigmas, sampler):
        pattern = lag.step_pattern(self.calibration.evaluations, self.true_every, self.guided_until)
        return LinearAGRun(self.calibration, pattern, sigmas, sampler, sampler_cfg(guider))

    def evaluate(self, state: LinearAGRun, evaluator, run):
        """True CFG, regressed unconditional, or conditional only, per the pattern."""
        state.check(evaluator)
        j = state.evaluation
        if j == 0 and state.cfg_notice:
            logger.warning(state.cfg_notice)
            if run is not None:
                run.mark(state.cfg_notice)
        state.evaluation += 1
        if state.problem is not None:
            if not state.reported:
                state.reported = True
                message = f"LinearAG: {state.problem}; sampling with true CFG (recalibrate for this setting)"
                logger.warning(message)
                if run is not None:
                    run.mark(message)
            return list(evaluator(True, True))
        kind = state.pattern[j]
        current = {"x": evaluator.x}
        if kind == lag.TRUE:
            current["cond"], uncond = evaluator(True, True)
            state.anchor = {"index": j, "uncond": uncond, **current}
        else:
            current["cond"], _ = evaluator(True, False)
            if run is not None and kind not in state.pattern[:j]:
                first = "regressed unconditional" if kind == lag.REGRESSED else "conditional only"
                run.mark(f"LinearAG: first {first} step")
            if kind == lag.CONDITIONAL:
                uncond = current["cond"]
            else:
                values = lag.term_tensors(state.calibration.terms, current, state.anchor, state.previous)
                uncond = lag.predict_uncond(state.calibration.coefficients[state.anchor["index"], j], values)
        state.previous = current
        return [current["cond"], uncond]


def patch_linear_ag(model, node_id=None, *, linear_ag: Calibration, true_every: int, guided_until: float):
    """Clone ``model`` with LinearAG installed; raises if the calibration is for another model."""
    if not isinstance(linear_ag, Calibration):
        raise ValueError(f"{NODE}: 'linear_ag' must come from LinearAG Calibrate or LinearAG Load, got "
                         f"{type(linear_ag).__name__}")
    check_number(NODE, "true_every", true_every, 1, 100)
    check_number(NODE, "guided_until", guided_until, 0.0, 1.0)
    identity = model_identity(model)
    if identity != linear_ag.info.get("model"):
        raise ValueError(f"{NODE}: the calibration was fitted on model {linear_ag.info.get('model')}, "
                         f"this MODEL is {identity}; calibrate this model (LinearAG Calibrate) first")
    return install(model, LinearAG(linear_ag, true_every, guided_until), node_id)


def calibration_files() -> list[str]:
    return model_files.choices(FOLDER)


def _pattern_inputs():
    return [
        io.Int.Input("true_every", default=2, min=1, max=100,
                     tooltip="In the guided part, true CFG (2 rows) on every n-th evaluation starting with the "
                             "first, the regressed unconditional (1 row) on the others. The paper: 2."),
        io.Float.Input("guided_until", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the evaluations that are guided (true or regressed); conditional "
                               "only afterwards. The paper: 0.5."),
    ]


class LinearAGCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitLinearAGCalibrate",
            display_name="LinearAG Calibrate (Guidance Kit)",
            category=CATEGORY,
            description="Runs full-CFG trajectories of the model over the prompts and fits LinearAG's regression "
                        "of the unconditional (saved to models/linear_ag/).",
            is_output_node=True,
            inputs=[
                model_input("The diffusion model to calibrate (it is not modified)."),
                io.Clip.Input("clip", tooltip="Text encoder for the prompts and the negative prompt."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Calibration prompts, one per line (a few dozen varied prompts is plenty)."),
                io.String.Input("negative_prompt", default="", multiline=True,
                                tooltip="The fixed negative prompt; LinearAG only applies with this negative."),
                io.Latent.Input("latent", tooltip="Empty latent: its size and batch (images per prompt)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed of the first prompt (seed + i for prompt i)."),
                io.Int.Input("steps", default=20, min=2, max=200, tooltip="Sampling steps (must match at use)."),
                io.Float.Input("cfg", default=7.0, min=1.01, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale of the calibration runs (use the scale you will sample with)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="Sampler (must match at use)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="Scheduler (must match at use)."),
                io.String.Input("filename", default="linear_ag",
                                tooltip="File name in models/linear_ag/ (.safetensors is added; overwritten)."),
            ],
            outputs=[LinearAGCalibration.Output(display_name="linear_ag")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, prompts, negative_prompt, latent, seed, steps, cfg, sampler_name, scheduler,
                filename) -> io.NodeOutput:
        check_numeric_inputs(cls, CALIBRATE_NODE, {"seed": seed, "steps": steps, "cfg": cfg})
        path = model_files.output_path(FOLDER, filename, CALIBRATE_NODE)
        check_latent(CALIBRATE_NODE, latent)
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{CALIBRATE_NODE}: 'prompts' is empty; give at least one prompt (one per line)")

        def check(evaluations: int) -> None:
            check_memory(CALIBRATE_NODE, memory_needs(model, latent, evaluations=evaluations), model.load_device)

        check(steps)  # one model evaluation per step: the fewest of any sampler
        log_work(CALIBRATE_NODE, f"{len(lines)} sampling runs of {steps} steps at batch "
                                 f"{latent['samples'].shape[0]} with full CFG, then a least-squares fit per "
                                 "evaluation pair")
        positives = [encode_prompt(clip, line) for line in lines]
        calibration = calibrate(model, positives, encode_prompt(clip, negative_prompt), latent, seed=seed, steps=steps,
                                cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                negative_prompt=negative_prompt, node_id=node_id_of(cls), after_first_run=check)
        calibration.save(path)
        logger.info(f"LinearAG: saved {path} ({calibration.describe()})")
        return io.NodeOutput(calibration)


def check_latent(where: str, latent) -> None:
    """A LATENT input with finite 'samples' of at least one image."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or samples.shape[0] < 1:
        raise ValueError(f"{where}: 'latent' must be a LATENT with a batch of images")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError(f"{where}: 'latent' holds NaN or inf values")


class LinearAGLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GuidanceKitLinearAGLoad",
            display_name="LinearAG Load Calibration (Guidance Kit)",
            category=CATEGORY,
            inputs=[io.Combo.Input("calibration", options=calibration_files(),
                                   tooltip="A file written by LinearAG Calibrate (models/linear_ag/).")],
            outputs=[LinearAGCalibration.Output(display_name="linear_ag")],
        )

    @classmethod
    def execute(cls, calibration) -> io.NodeOutput:
        path = model_files.resolve(FOLDER, calibration, LOAD_NODE, "calibration")
        return io.NodeOutput(Calibration.load(path, f"{LOAD_NODE} 'calibration'"))


def _apply_inputs():
    return [LinearAGCalibration.Input("linear_ag", tooltip="From LinearAG Calibrate or LinearAG Load."),
            *_pattern_inputs()]


LinearAGGuider, LinearAGModelPatch = guider_and_patch(TwinSpec(
    name="LinearAG", category=CATEGORY, options=_apply_inputs, patch=patch_linear_ag,
    model_tooltip=CALIBRATED_MODEL_TOOLTIP,
    guider_id="GuidanceKitLinearAGGuider", guider_display="LinearAG Guider (Guidance Kit)",
    guider_description="CFG whose unconditional is predicted by a calibrated linear regression on most steps "
                       "(LinearAG, arXiv 2312.12487). For SamplerCustomAdvanced.",
    guider_inputs=lambda: guider_inputs(model_tooltip=CALIBRATED_MODEL_TOOLTIP, cfg_default=7.0,
                                        negative_tooltip="The calibrated negative prompt's conditioning."),
    patch_id="GuidanceKitLinearAG", patch_display="LinearAG (Guidance Kit)",
    patch_description="MODEL patch for KSampler: CFG whose unconditional is predicted by a calibrated linear "
                      "regression on most steps (LinearAG, arXiv 2312.12487).",
))


NODES = [LinearAGCalibrate, LinearAGLoad, LinearAGGuider, LinearAGModelPatch]
