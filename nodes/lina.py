"""Causality-Aware Schedule (after LINA): a SIGMAS node that spends ``share`` of a fixed step budget before a
boundary in the early, high-noise phase (samplers/lina.py holds the formula; the boundary is in the model's own
percent-of-denoising terms, so one setting means the same for eps, v and flow models)."""
import comfy.samplers
from comfy_api.latest import io

from ..samplers.lina import causality_aware_schedule
from .contract import check_numeric_inputs

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


NODES = [LINASchedule]
