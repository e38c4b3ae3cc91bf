"""Adaptive Guidance and LinearAG on the toy world: model rows saved vs plain CFG at the oracle's pass rate.

Every configuration samples the same prompts with the same noise (``runner.run``: euler, scheduler
"simple", ``STEPS`` steps, ``SEEDS`` images per prompt, CFG scale ``CFG_SCALE``):

* ``cfg``: plain CFG (the baseline); ``cond_only``: cfg = 1 (what dropping guidance costs);
* ``ag_<γ̄>``: the Adaptive Guidance guider at a sweep of thresholds (default quantity for the flow
  family);
* ``linear_<k>_<f>``: the LinearAG guider, true CFG every k-th evaluation in the first fraction f
  of the schedule, the regressed unconditional between, conditional only after.  Calibrated on
  the *dev* prompts with other noise (seed ``CALIBRATION_SEED``);
* ``window_<k>``: the peer approach (AutomaticCFG-style sigma-window uncond skipping): CFG while
  sigma is in the fixed window of the first k steps, conditional only outside, at the rows of the
  AG / LinearAG configuration it is compared to.

The AG threshold and the LinearAG pattern are chosen on the dev set (among the settings reaching
the target's row saving, the one closest to the CFG images); validation figures are reported for
that choice (validation is never tuned on).  Pass rates come with the paired difference to CFG
(same prompts and noise: images gained, lost, and its standard error).  Also reported: the
regression's held-out error against reusing the previous step's unconditional, and the node's own
per-step overhead on the tiny SD1.5-style model at γ̄ = 1.0 (time inside the patch minus time inside
the model, over the run's wall time).  ``--families`` adds the study that chose AG's default quantity
per model family: the toy denoiser sampled as a flow model and re-expressed as an ε- and a v-prediction model on the SD
noise schedule ("normal" scheduler), each quantity at a sweep of thresholds.

Last line: JSON.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402

CFG_SCALE = 4.0
STEPS = 20
SEEDS = 4
CALIBRATION_SEED = 10_000
AG_THRESHOLDS = (0.95, 0.96, 0.97, 0.98, 0.99, 0.995)
LINEAR_PATTERNS = ((2, 0.5), (3, 0.3), (4, 0.4), (5, 0.5), (10, 1.0))
# What the full run chooses on the dev set; --quick runs only these (validation set, half of it).
DEFAULT_AG_THRESHOLD = 0.97
DEFAULT_LINEAR_PATTERN = (3, 0.3)
AG_TARGET = {"saving": 0.35, "tolerance": 0.01}
LINEAR_TARGET = {"saving": 0.45, "tolerance": 0.02}
PEER_KEYS = ("rows", "pass", "pass_delta", "pass_delta_se", "distance_to_reference", "seconds")
TABLE_KEYS = ("rows", "rows_saved", "pass", "pass_delta", "pass_delta_se", "gained", "lost", "distance_to_reference",
              "seconds", "single_pass", "relation_pass", "mirror_pass")
TERM_SETS = {"default": ("cond", "anchor_cond", "anchor_uncond"),
             "plus_previous_cond": ("cond", "anchor_cond", "anchor_uncond", "previous_cond"),
             "plus_x": ("cond", "x", "anchor_cond", "anchor_uncond"),
             "plus_x_anchor_x": ("cond", "x", "anchor_cond", "anchor_uncond", "anchor_x"),
             "plus_all_latents": ("cond", "x", "anchor_cond", "anchor_uncond", "anchor_x", "previous_cond",
                                  "previous_x")}
FAMILY_THRESHOLDS = {"noise": (0.999, 0.9999), "denoised": (0.999, 0.9995, 0.9998, 0.9999),
                     "guidance": (0.99, 0.995, 0.998, 0.999)}


# ---------------------------------------------------------------- configurations

def ag(threshold: float, measure: str = "auto"):
    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceGuider

    return lambda model, positive, negative: AdaptiveGuidanceGuider.execute(
        model, positive, negative, CFG_SCALE, threshold, measure, 0.0, 1.0)[0]


def linear(calibration, true_every: int, guided_until: float):
    from guidance_kit.nodes.linear_ag import LinearAGGuider

    return lambda model, positive, negative: LinearAGGuider.execute(
        model, positive, negative, CFG_SCALE, calibration, true_every, guided_until)[0]


def window(steps_guided: int):
    """The peer: CFG while sigma lies in the fixed window of the first ``steps_guided`` steps."""
    from harness.sampling import switched_cfg_guider

    def guided(sigma, sigmas):
        return steps_guided > 0 and sigma >= float(sigmas[steps_guided - 1])

    return lambda model, positive, negative: switched_cfg_guider(model, positive, negative, CFG_SCALE, guided)


# ---------------------------------------------------------------- measuring

def figures(result, reference, prompts: int, seeds: int) -> dict:
    """The runner's figures plus rows per image, rows saved, and the paired pass-rate difference to
    the reference (same prompts and noise): images gained/lost and the difference's standard error."""
    out = result.figures(reference)
    out["rows_per_image"] = round(result.rows / (prompts * seeds), 3)
    out["rows_saved"] = round(1 - result.rows / reference.rows, 4)
    differences = [int(mine["pass"]) - int(theirs["pass"])
                   for (_, mine), (_, theirs) in zip(result.verdicts, reference.verdicts)]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / max(1, len(differences) - 1)
    out.update(gained=differences.count(1), lost=differences.count(-1), pass_delta=round(mean, 4),
               pass_delta_se=round((variance / len(differences)) ** 0.5, 4))
    return out


def sweep(world, prompts, seeds, configurations: dict, reference=None, scheduler="simple") -> tuple[dict, object]:
    """({name: figures}, reference Result): distances and savings against ``reference`` (default: the
    first configuration, the CFG baseline)."""
    table = {}
    for name, make_guider in configurations.items():
        result = runner.run(world, name, make_guider, prompts, seeds=seeds, steps=STEPS, scheduler=scheduler)
        reference = reference or result
        table[name] = figures(result, reference, len(prompts), seeds)
    return table, reference


def choose(dev: dict, candidates: list[str], target: dict) -> str:
    """Among the candidates reaching the target's row saving on dev, the one closest to the CFG
    images (the pass rate moves by a few images between settings, below its own noise: see
    ``pass_delta_se``); the most saving candidate if none reaches it."""
    reaching = [name for name in candidates if dev[name]["rows_saved"] >= target["saving"]]
    if reaching:
        return min(reaching, key=lambda name: dev[name]["distance_to_reference"])
    return max(candidates, key=lambda name: dev[name]["rows_saved"])


def calibrate(world, prompts, seeds, terms=None):
    from guidance_kit.nodes.linear_ag import calibrate as fit
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from guidance_kit.samplers.linear_ag import TERMS

    start = time.perf_counter()
    calibration = fit(world.model, [world.encode(prompt) for prompt, _ in prompts], world.encode(""),
                      ToyWorldEmptyLatent.execute(seeds)[0], seed=CALIBRATION_SEED, steps=STEPS, cfg=CFG_SCALE,
                      sampler_name="euler", scheduler="simple", terms=terms or TERMS)
    return calibration, time.perf_counter() - start


def regression_error(world, calibration, prompts, seeds, distances=(1, 2, 5, 10)) -> dict:
    """Held-out MSE of the unconditional estimate on ``prompts`` (validation prompts, other noise than
    the calibration), predicted from an anchor ``distance`` evaluations back, against reusing the
    anchor's unconditional / guidance difference and against no guidance (û = D_c); per distance."""
    from guidance_kit.nodes.linear_ag import full_cfg_trajectories
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from guidance_kit.samplers.linear_ag import heldout_errors

    totals = {distance: {} for distance in distances}
    for xs, conds, unconds, _, _ in full_cfg_trajectories(
            world.model, [world.encode(prompt) for prompt, _ in prompts], world.encode(""),
            ToyWorldEmptyLatent.execute(seeds)[0], seed=0, steps=STEPS, cfg=CFG_SCALE, sampler_name="euler",
            scheduler="simple"):
        for distance in distances:
            for name, value in heldout_errors(calibration.coefficients, calibration.terms, xs, conds, unconds,
                                              distance).items():
                totals[distance][name] = totals[distance].get(name, 0.0) + value / len(prompts)
    return {f"anchor_{distance}_back": {
        "mse": {k: float(f"{v:.4g}") for k, v in errors.items()},
        "ratio_vs_previous_uncond": round(errors["regression"] / errors["previous_uncond"], 4),
        "ratio_vs_previous_difference": round(errors["regression"] / errors["previous_difference"], 4),
        "ratio_vs_conditional": round(errors["regression"] / errors["conditional"], 4)}
        for distance, errors in totals.items()}


def node_overhead(repeats: int) -> dict:
    """AG at γ̄ = 1.0 on the tiny SD1.5-style model (batch 2, 20 steps): seconds inside the patch
    but outside ComfyUI's calc_cond_batch, over the run's wall time; plus the end-to-end medians
    of alternating runs against the Reference CFG guider (same stats wrappers) and the stock CFGGuider."""
    import comfy.samplers

    from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceGuider
    from guidance_kit.nodes.reference_guider import ReferenceCFGGuider
    from harness import tiny_models
    from harness.sampling import cfg_guider, sample_guider

    tiny = tiny_models.build("sd15_eps")
    latent = tiny.empty_latent(batch=2)
    clock = {"patch": 0.0, "model": 0.0}
    stock_calc = comfy.samplers.calc_cond_batch

    def timed_calc(*args, **kwargs):
        start = time.perf_counter()
        try:
            return stock_calc(*args, **kwargs)
        finally:
            clock["model"] += time.perf_counter() - start

    def instrumented_ag():
        guider = AdaptiveGuidanceGuider.execute(tiny.patcher, tiny.positive, tiny.negative, 5.0, 1.0, "auto", 0.0,
                                                1.0)[0]
        options = guider.model_patcher.model_options
        patch = options["sampler_calc_cond_batch_function"]

        def timed_patch(args):
            start = time.perf_counter()
            try:
                return patch(args)
            finally:
                clock["patch"] += time.perf_counter() - start
        options["sampler_calc_cond_batch_function"] = timed_patch
        return guider

    makers = {"stock": lambda: cfg_guider(tiny.patcher, tiny.positive, tiny.negative, 5.0),
              "reference": lambda: ReferenceCFGGuider.execute(tiny.patcher, tiny.positive, tiny.negative, 5.0)[0],
              "ag": lambda: AdaptiveGuidanceGuider.execute(tiny.patcher, tiny.positive, tiny.negative, 5.0, 1.0, "auto",
                                                           0.0, 1.0)[0]}
    seconds = {name: [] for name in makers}
    for repeat in range(repeats + 1):
        for name, make in makers.items():
            start = time.perf_counter()
            sample_guider(make(), latent, steps=STEPS)
            if repeat:  # the first round warms up
                seconds[name].append(time.perf_counter() - start)
    comfy.samplers.calc_cond_batch = timed_calc
    try:
        wall = []
        for _ in range(repeats):
            start = time.perf_counter()
            sample_guider(instrumented_ag(), latent, steps=STEPS)
            wall.append(time.perf_counter() - start)
    finally:
        comfy.samplers.calc_cond_batch = stock_calc
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"overhead_pct": round(100 * (clock["patch"] - clock["model"]) / sum(wall), 3),
            "overhead_ms_per_step": round(1000 * (clock["patch"] - clock["model"]) / (repeats * STEPS), 4),
            "step_ms": {name: round(1000 * value / STEPS, 3) for name, value in median.items()},
            "end_to_end_vs_reference_pct": round(100 * (median["ag"] / median["reference"] - 1), 2),
            "end_to_end_vs_stock_pct": round(100 * (median["ag"] / median["stock"] - 1), 2)}


# ---------------------------------------------------------------- per-family quantity study

def reexpressed_world(world, prediction: str):
    """The toy denoiser as an ε- or v-prediction model on the SD1.5 discrete schedule (VE sampling
    space, x = x0 + σ·ε): the flow network is called at flow time s = σ / (1 + σ) on
    x_flow = x / (1 + σ), and its velocity is converted to the family's output."""
    import torch

    import comfy.model_base
    import comfy.model_patcher

    from guidance_kit.nodes.toyworld import ToyWorldConfig

    class FlowAsDiscrete(torch.nn.Module):
        def __init__(self, network, model_sampling):
            super().__init__()
            self.network, self.blocks, self.dtype = network, network.blocks, network.dtype
            self.sigma_of = model_sampling.sigma  # a bound method: the schedule is not registered twice

        def forward(self, x, timesteps, context=None, transformer_options={}, **kwargs):  # noqa: B006
            sigma = self.sigma_of(timesteps).view(-1, 1, 1, 1).to(x)
            x_ve = x * (sigma ** 2 + 1).sqrt()
            s = sigma / (1 + sigma)
            x_flow = x_ve / (1 + sigma)
            velocity = self.network(x_flow, s.flatten() * 1000, context, transformer_options, **kwargs)
            denoised = x_flow - s * velocity
            if prediction == "eps":
                return (x_ve - denoised) / sigma
            return (x_ve / (sigma ** 2 + 1) - denoised) * (sigma ** 2 + 1).sqrt() / sigma

    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}[prediction]
    config = ToyWorldConfig({"disable_unet_model_creation": True})
    config.sampling_settings = {}
    model = comfy.model_base.BaseModel(config, model_type=model_type)
    model.diffusion_model = FlowAsDiscrete(world.model.model.diffusion_model, model.model_sampling)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=world.model.load_device,
                                               offload_device=world.model.offload_device)
    return runner.ToyWorld(patcher, world.clip, world.vae, _encoded=world._encoded)


def family_study(world, prompts, seeds) -> dict:
    """Per family, per quantity: the threshold sweep's (rows saved, pass, distance to CFG).

    The v-prediction re-expression is the same denoiser on the same schedule as the ε one (D, ε̂ and
    hence every quantity agree up to rounding; ``v_vs_eps_cfg_distance`` checks it on CFG), so its
    sweep is the ε one: the toy cannot tell real ε- and v-trained networks apart."""
    study = {}
    eps_world = reexpressed_world(world, "eps")
    for family, family_world, scheduler in (("flow", world, "simple"), ("eps_v", eps_world, "normal")):
        configurations = {"cfg": runner.cfg(CFG_SCALE), "cond_only": runner.cfg(1.0)}
        configurations.update({f"{quantity}_{threshold}": ag(threshold, quantity)
                               for quantity, thresholds in FAMILY_THRESHOLDS.items() for threshold in thresholds})
        table, reference = sweep(family_world, prompts, seeds, configurations, scheduler=scheduler)
        study[family] = {name: {key: r[key] for key in ("rows_saved", "pass", "distance_to_reference")}
                         for name, r in table.items()}
    v_cfg = runner.run(reexpressed_world(world, "v"), "cfg_v", runner.cfg(CFG_SCALE), prompts, seeds=seeds, steps=STEPS,
                       scheduler="normal")
    study["v_vs_eps_cfg_distance"] = v_cfg.distance_to(reference)
    return study


def terms_study(world, dev, validation, seeds, patterns) -> dict:
    """LinearAG's regression terms: each candidate set calibrated on dev, run on dev (the chosen
    default is the set with the best dev figures) with its held-out error on validation prompts."""
    study = {}
    for name, terms in TERM_SETS.items():
        calibration, _ = calibrate(world, dev, seeds, terms)
        configurations = {"cfg": runner.cfg(CFG_SCALE)}
        configurations.update({f"linear_{k}_{f}": linear(calibration, k, f) for k, f in patterns})
        table, _ = sweep(world, dev, seeds, configurations)
        study[name] = {"terms": list(terms), "heldout": regression_error(world, calibration, validation[:4], seeds),
                       **{config: {key: r[key] for key in ("rows_saved", "pass", "distance_to_reference")}
                          for config, r in table.items() if config != "cfg"}}
    return study


# ---------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="half the validation prompts, 2 images each, only the default AG/LinearAG settings")
    parser.add_argument("--families", action="store_true", help="also run the per-family quantity study (dev set)")
    parser.add_argument("--terms", action="store_true", help="also run LinearAG's regression-terms study (dev set)")
    args = parser.parse_args(argv)
    seeds = 2 if args.quick else SEEDS
    thresholds = (DEFAULT_AG_THRESHOLD,) if args.quick else AG_THRESHOLDS
    patterns = (DEFAULT_LINEAR_PATTERN,) if args.quick else LINEAR_PATTERNS

    world = runner.load_world()
    dev, validation = runner.prompt_set("dev", args.quick), runner.prompt_set("validation", args.quick)
    calibration, calibration_seconds = calibrate(world, dev, seeds)
    configurations = {"cfg": runner.cfg(CFG_SCALE)}
    if not args.quick:
        configurations["cond_only"] = runner.cfg(1.0)
    configurations.update({f"ag_{t}": ag(t) for t in thresholds})
    configurations.update({f"linear_{k}_{f}": linear(calibration, k, f) for k, f in patterns})
    splits = {"validation": validation} if args.quick else {"dev": dev, "validation": validation}

    tables, references = {}, {}
    for split, prompts in splits.items():
        tables[split], references[split] = sweep(world, prompts, seeds, configurations)
    choice_table = tables.get("dev", tables["validation"])  # one candidate each in --quick
    ag_name = choose(choice_table, [f"ag_{t}" for t in thresholds], AG_TARGET)
    linear_name = choose(choice_table, [f"linear_{k}_{f}" for k, f in patterns], LINEAR_TARGET)
    for split, prompts in splits.items():
        table = tables[split]
        peers = {f"window_{k}": window(k) for k in sorted({round(table[ag_name]["rows_per_image"] - STEPS),
                                                           round(table[linear_name]["rows_per_image"] - STEPS)})}
        table.update(sweep(world, prompts, seeds, peers, reference=references[split])[0])

    val = tables["validation"]
    ag_peer = val[f"window_{round(val[ag_name]['rows_per_image'] - STEPS)}"]
    linear_peer = val[f"window_{round(val[linear_name]['rows_per_image'] - STEPS)}"]
    error = regression_error(world, calibration, validation[:4], seeds)
    out = {
        "quick": args.quick, "steps": STEPS, "seeds": seeds, "cfg_scale": CFG_SCALE,
        "prompts": {"dev": len(dev), "validation": len(validation)},
        "cfg_rows": val["cfg"]["rows"], "cfg_pass": val["cfg"]["pass"], "cfg_seconds": val["cfg"]["seconds"],
        "cond_only_pass": val.get("cond_only", {}).get("pass"),
        "ag_threshold": float(ag_name.split("_")[1]), "ag_rows": val[ag_name]["rows"], "ag_pass": val[ag_name]["pass"],
        "ag_rows_saved": val[ag_name]["rows_saved"], "ag_seconds": val[ag_name]["seconds"],
        "ag_distance_to_cfg": val[ag_name]["distance_to_reference"],
        "ag_pass_delta": val[ag_name]["pass_delta"], "ag_pass_delta_se": val[ag_name]["pass_delta_se"],
        "linear_pattern": linear_name.removeprefix("linear_"), "linear_terms": list(calibration.terms),
        "linear_rows": val[linear_name]["rows"], "linear_pass": val[linear_name]["pass"],
        "linear_rows_saved": val[linear_name]["rows_saved"], "linear_seconds": val[linear_name]["seconds"],
        "linear_distance_to_cfg": val[linear_name]["distance_to_reference"],
        "linear_pass_delta": val[linear_name]["pass_delta"], "linear_pass_delta_se": val[linear_name]["pass_delta_se"],
        "linear_calibration_seconds": round(calibration_seconds, 2), "linear_regression_error": error,
        "peer_at_ag_rows": {k: ag_peer[k] for k in PEER_KEYS},
        "peer_at_linear_rows": {k: linear_peer[k] for k in PEER_KEYS},
    }
    out["targets"] = {
        "ag_rows_saved_ge_35pct": out["ag_rows_saved"] >= AG_TARGET["saving"],
        "ag_pass_within_1pt": out["ag_pass"] >= out["cfg_pass"] - AG_TARGET["tolerance"] - 1e-9,
        "linear_rows_saved_ge_45pct": out["linear_rows_saved"] >= LINEAR_TARGET["saving"],
        "linear_pass_within_2pt": out["linear_pass"] >= out["cfg_pass"] - LINEAR_TARGET["tolerance"] - 1e-9,
        "ag_pass_ge_peer": out["ag_pass"] >= ag_peer["pass"],
        "ag_closer_to_cfg_than_peer": out["ag_distance_to_cfg"] < ag_peer["distance_to_reference"],
        "linear_pass_ge_peer": out["linear_pass"] >= linear_peer["pass"],
        "linear_closer_to_cfg_than_peer": out["linear_distance_to_cfg"] < linear_peer["distance_to_reference"],
    }
    out["overhead"] = node_overhead(repeats=3 if args.quick else 7)
    out["overhead_pct"] = out["overhead"]["overhead_pct"]
    out["targets"]["overhead_lt_2pct"] = out["overhead_pct"] < 2.0
    out["tables"] = {split: {name: {k: r[k] for k in TABLE_KEYS} for name, r in table.items()}
                     for split, table in tables.items()}
    if args.families:
        out["families"] = family_study(world, dev, seeds)
    if args.terms:
        out["terms_study"] = terms_study(world, dev, validation, seeds, patterns)
    runner.emit(out)


if __name__ == "__main__":
    main()
