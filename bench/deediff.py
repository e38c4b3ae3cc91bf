"""DeeDiff early exit on the toy world: transformer block-rows saved vs the full model at the oracle's pass rate.

Every configuration samples the same prompts with the same noise (``runner.run``: euler, scheduler "simple",
``STEPS`` steps, ``SEEDS`` images per prompt, CFG scale ``CFG_SCALE``); "blocks" are the batch rows through each
of the DiT's 8 blocks (``Result.blocks``), so plain CFG costs 2 rows x 8 blocks per image and step.

* ``full``: plain CFG on the full model (the reference);
* ``exit_<threshold>``: the DeeDiff Early Exit patch with a bundle (``--heads``; default the shipped joint toy bundle
  ``toyworld/deediff/toy_dit_joint.safetensors``, heads + block adapters; ``toy_dit_heads.safetensors`` is the
  heads-only one) at a sweep of confidence thresholds (``--thresholds``);
* ``adapted`` (validation, bundles with adapters): threshold 1.0, the adapted full model against the original;
* ``cache_<threshold>``: the caching peer, First-Block-Cache (``FirstBlockCache``): per model row, block 1 always
  runs; when its residual changed by less than the threshold (mean absolute change relative to the residual of the
  last step that ran in full), the row reuses that step's residual of blocks 2-8 and skips them.  ComfyUI core's
  EasyCache runs on the toy model but breaks its images (2 dev prompts x 4 seeds: pass 0.0 against 0.875 at
  threshold 0.1, 30% of the blocks skipped), so it is no fair peer here.  Compared at the blocks of the chosen
  DeeDiff threshold;
* ``ag_exit_<threshold>``: Adaptive Guidance (γ̄ ``AG_THRESHOLD``) with DeeDiff stacked on it, against plain CFG.

The DeeDiff threshold is chosen on dev (the most blocks saved with the pass rate within ``TARGET["tolerance"]`` of
the full model's; the most saving threshold if none is), likewise AG + DeeDiff (``AG_TARGET``), and the cache
threshold whose dev blocks are closest to the chosen DeeDiff's; validation figures are reported for those choices.
Pass rates come with the paired difference to the full model (same prompts and noise) and its standard error.
``exit_depth_by_step``: mean blocks run per model row at each step (validation, chosen threshold).
``--quick``: validation only (every other prompt) at the ``DEFAULT_*`` settings, without AG alone, the cache peer
at the ``QUICK_CACHE_THRESHOLDS`` value whose blocks are closest to DeeDiff's;
``--every n``: every n-th prompt of each set (the sets list single, relation, then mirror prompts, so every kind
stays in).

``--probe``: exit error per block and simulated exits on dev rows (``probe``); ``--timing``: wall time, interleaved
rounds of full / DeeDiff / First-Block-Cache / AG + DeeDiff, ratio mean ± SE against the block-row ratio.

Last line: JSON.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402
from adaptive_guidance import figures  # noqa: E402  (paired pass-rate difference to a reference)

CFG_SCALE = 4.0
STEPS = 20
SEEDS = 4
BLOCKS = 8
THRESHOLDS = (0.65, 0.7, 0.75, 0.8, 0.85)
CACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
AG_THRESHOLD = 0.99
AG_EXIT_THRESHOLDS = (0.7, 0.75, 0.8, 0.85)
TARGET = {"saving": 0.40, "tolerance": 0.02}
AG_TARGET = {"saving": 0.55, "tolerance": 0.03}
# --quick: validation only at these settings, the full protocol's choices on dev with the shipped joint bundle
# (docs/deediff.md: the only threshold within 2 points of the full model on dev).
DEFAULT_THRESHOLD = 0.85
QUICK_CACHE_THRESHOLDS = (0.1, 0.3)  # the one at the blocks closest to DeeDiff's is the matched peer
DEFAULT_AG_EXIT_THRESHOLD = 0.85


class DepthByStep:
    """Collects the run records of the configuration's guiders (one per prompt) for exit depth per step."""

    def __init__(self):
        self.guiders = []

    def keep(self, guider):
        self.guiders.append(guider)
        return guider

    def mean_depth(self) -> list[float]:
        from guidance_kit.nodes.contract.stats import stats_sink

        totals = [[0, 0] for _ in range(STEPS)]
        for guider in self.guiders:
            run = stats_sink(guider.model_patcher).last
            for index, evaluation in enumerate(run.evaluations):
                depths = evaluation.signals.get("exit_depth", [])
                totals[run.step_of(index) - 1][0] += sum(depths)
                totals[run.step_of(index) - 1][1] += len(depths)
        return [round(total / count, 3) if count else None for total, count in totals]


def exit_config(heads, threshold: float, ag_threshold: float | None = None, depth: DepthByStep | None = None):
    from guidance_kit.nodes.adaptive_guidance import patch_adaptive_guidance
    from guidance_kit.nodes.contract.guiders import cfg_guider
    from guidance_kit.nodes.deediff import patch_deediff

    def make(model, positive, negative):
        if ag_threshold is not None:
            model = patch_adaptive_guidance(model, threshold=ag_threshold, measure="auto",
                                            start_percent=0.0, end_percent=1.0)
        guider = cfg_guider(patch_deediff(model, heads, threshold), positive, negative, CFG_SCALE)
        return depth.keep(guider) if depth is not None else guider
    return make


class FirstBlockCache:
    """First-Block-Cache on the toy DiT's block replacements, one cache per sampling run and model row."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.first_residual = self.rest_residual = None
        self.active = self.first_output = None

    def block(self, index: int, blocks: int):
        import torch

        from guidance_kit.samplers import deediff

        def replace(args, extra):
            block = extra["original_block"]
            h = args["img"]
            if index == 0:
                out = block(args)
                residual = out["img"] - h
                if self.first_residual is None or self.first_residual.shape != residual.shape:
                    self.first_residual, self.rest_residual = residual, None
                    self.active = torch.ones(h.shape[0], dtype=torch.bool)
                else:
                    change = (residual - self.first_residual).abs().flatten(1).mean(1) / \
                        self.first_residual.abs().flatten(1).mean(1)
                    self.active = change.cpu() >= self.threshold
                    self.first_residual[self.active] = residual[self.active]
                self.first_output = out["img"]
                return out
            rows = self.active.nonzero().flatten()
            out = args if rows.numel() == 0 else deediff.merge_rows(
                args, block(deediff.select_rows(args, rows, h.shape[0])), rows)
            if index < blocks - 1:
                return out
            if self.rest_residual is None:
                self.rest_residual = out["img"] - self.first_output
                return out
            skipped = (~self.active).nonzero().flatten()
            self.rest_residual[rows] = (out["img"] - self.first_output)[rows]
            merged = out["img"].clone()
            merged[skipped] = self.first_output[skipped] + self.rest_residual[skipped]
            return {"img": merged}
        return replace


def cache_config(threshold: float):
    from comfy.patcher_extension import WrappersMP

    from guidance_kit.nodes.contract.guiders import cfg_guider

    def make(model, positive, negative):
        patched = model.clone()
        key = "guidance_kit.bench.first_block_cache"

        def outer_sample(executor, *args, **kwargs):
            cache = FirstBlockCache(threshold)
            options = executor.class_obj.model_options.setdefault("transformer_options", {})
            replace = {**options.get("patches_replace", {})}
            replace["dit"] = {**replace.get("dit", {}), **{("single_block", i): cache.block(i, BLOCKS)
                                                            for i in range(BLOCKS)}}
            options["patches_replace"] = replace
            return executor(*args, **kwargs)

        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, key, outer_sample)
        return cfg_guider(patched, positive, negative, CFG_SCALE)
    return make


def ag_config(threshold: float):
    from guidance_kit.nodes.adaptive_guidance import patch_adaptive_guidance
    from guidance_kit.nodes.contract.guiders import cfg_guider

    return lambda model, positive, negative: cfg_guider(patch_adaptive_guidance(
        model, threshold=threshold, measure="auto", start_percent=0.0, end_percent=1.0), positive, negative, CFG_SCALE)


def block_figures(result, reference, prompts: int) -> dict:
    """Pass rate with the paired difference to ``reference``, blocks, blocks saved and the wall-time ratio."""
    out = figures(result, reference, prompts, SEEDS)
    out.update(blocks_saved=round(1 - result.blocks / reference.blocks, 4),
               seconds_ratio=round(result.seconds / reference.seconds, 4))
    return out


def sweep(world, prompts, configurations: dict, reference=None) -> tuple[dict, object]:
    table = {}
    for name, make_guider in configurations.items():
        result = runner.run(world, name, make_guider, prompts, seeds=SEEDS, steps=STEPS)
        reference = reference or result
        table[name] = block_figures(result, reference, len(prompts))
        print(json.dumps({name: table[name]}, sort_keys=True), file=sys.stderr, flush=True)
    return table, reference


def choose(dev: dict, candidates: list[str], target: dict) -> str:
    """The candidate saving the most blocks on dev with its pass rate within the tolerance of the reference's;
    the most saving candidate if none is within it."""
    within = [name for name in candidates if dev[name]["pass_delta"] >= -target["tolerance"]]
    return max(within or candidates, key=lambda name: dev[name]["blocks_saved"])


def probe(world, heads, prompts, thresholds=(0.7, 0.75, 0.8, 0.85, 0.88, 0.9)) -> dict:
    """Every exit's prediction through the shared head against the final one, on the recorded model rows of
    full-CFG runs of ``prompts`` (through the adapted model when ``heads`` has adapters): mean |error| and mean
    confidence per exit, their correlation, the blocks and mean exit error a threshold gives when exits are
    simulated on those rows, and (with adapters) the adapted full model's mean |difference| to the original's."""
    import torch

    import comfy.model_management

    from guidance_kit.nodes import deediff as adapter
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from guidance_kit.samplers import deediff

    recording = adapter.record_model_inputs(world.model, [world.encode(p) for p, _ in prompts], world.encode(""),
                                            ToyWorldEmptyLatent.execute(SEEDS)[0], seed=0, steps=STEPS, cfg=CFG_SCALE,
                                            sampler_name="euler", scheduler="simple")
    arch = adapter.architecture(world.model, "probe")
    parts = torch.arange(len(recording)).split(64)
    originals = [adapter.exit_predictions(world.model, arch, *_last(adapter.block_outputs(
        world.model, arch, *recording.rows(part))))[0] for part in parts]
    model = adapter.apply_adapters(world.model, heads)
    comfy.model_management.load_models_gpu([model])
    confidences, errors, drift = [], [], []
    for part, original in zip(parts, originals):
        hidden, vec = adapter.block_outputs(model, arch, *recording.rows(part))
        predictions = adapter.exit_predictions(model, arch, hidden, vec)
        with torch.no_grad():
            confidences.append(torch.stack([deediff.confidence(heads.heads(i, hidden[i], vec))
                                            for i in range(heads.heads.exits)], 1))
        errors.append(torch.stack([(p - predictions[-1]).abs().flatten(1).mean(1) for p in predictions[:-1]], 1))
        drift.append((predictions[-1] - original).abs().flatten(1).mean(1))
    comfy.model_management.load_models_gpu([world.model])
    confidence, error = torch.cat(confidences), torch.cat(errors)
    simulated = {}
    for threshold in thresholds:
        reached = confidence >= threshold
        depth = torch.where(reached.any(1), reached.float().argmax(1) + 1, torch.full((len(confidence),), BLOCKS))
        exit_error = [float(error[row, d - 1]) if d < BLOCKS else 0.0 for row, d in enumerate(depth.tolist())]
        simulated[str(threshold)] = {"blocks_saved": round(1 - float(depth.float().mean()) / BLOCKS, 4),
                                     "mean_exit_error": round(sum(exit_error) / len(exit_error), 4)}
    return {"rows": len(recording), "adapters": heads.adapters is not None,
            "adapted_vs_original_output": round(float(torch.cat(drift).mean()), 4),
            "exit_error": [round(float(e), 4) for e in error.mean(0)],
            "exit_confidence": [round(float(c), 3) for c in confidence.mean(0)],
            "confidence_error_correlation": [round(float(torch.corrcoef(torch.stack([confidence[:, i], -error[:, i]]))
                                                          [0, 1]), 3) for i in range(error.shape[1])],
            "simulated": simulated}


def _last(outputs):
    """(the last block's image tokens only, vec) of ``block_outputs``."""
    hidden, vec = outputs
    return hidden[-1:], vec


def interleaved_timing(world, heads, prompt: str, threshold: float, cache: float, ag_exit: float,
                       rounds: int) -> dict:
    """Wall time of full / DeeDiff / First-Block-Cache / AG + DeeDiff sampling one prompt in turn, ``rounds`` times
    (load drift on a shared machine hits all alike): per configuration the per-round ratios to the full model,
    their mean with its standard error, their median, and the block-row ratio of the same runs."""
    import statistics
    import time

    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from harness.sampling import sample_guider

    configurations = {"full": runner.cfg(CFG_SCALE), "exit": exit_config(heads, threshold),
                      "cache": cache_config(cache), "ag_exit": exit_config(heads, ag_exit, AG_THRESHOLD)}
    seconds = {name: [] for name in configurations}
    blocks = {name: 0 for name in configurations}
    for round_ in range(rounds):
        for name, make in configurations.items():
            guider = make(world.model, world.encode(prompt), world.encode(""))
            start = time.perf_counter()
            with BlockRowCounter(world.model.model.diffusion_model.blocks) as counter:
                sample_guider(guider, ToyWorldEmptyLatent.execute(SEEDS)[0], steps=STEPS, scheduler="simple",
                              seed=round_)
            seconds[name].append(round(time.perf_counter() - start, 3))
            blocks[name] += counter.rows
    out = {"rounds": rounds, "seconds": seconds}
    for name, times in seconds.items():
        ratios = [t / f for t, f in zip(times, seconds["full"])]
        out[name] = {"ratio_mean": round(statistics.mean(ratios), 3),
                     "ratio_se": round(statistics.stdev(ratios) / len(ratios) ** 0.5, 3) if len(ratios) > 1 else None,
                     "ratio_median": round(statistics.median(ratios), 3),
                     "block_ratio": round(blocks[name] / blocks["full"], 3)}
    return out


class BlockRowCounter:
    """Batch rows through each block of the toy DiT (forward hooks), summed over the blocks."""

    def __init__(self, blocks):
        self.rows = 0
        self.handles = [block.register_forward_hook(self._count) for block in blocks]

    def _count(self, module, inputs, output):
        self.rows += int(inputs[0].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="validation only, half its prompts, default settings")
    parser.add_argument("--every", type=int, default=0, help="every n-th prompt of each set (default: all; --quick 2)")
    parser.add_argument("--probe", action="store_true", help="only the exit-error probe on every 13th dev prompt")
    parser.add_argument("--timing", action="store_true", help="only the interleaved wall-time measurement (at "
                                                              "--threshold, --cache-threshold, --ag-exit-threshold)")
    parser.add_argument("--heads", default=None, help="a DeeDiff bundle (default: the shipped joint toy bundle)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS, help="DeeDiff sweep on dev")
    parser.add_argument("--cache-thresholds", type=float, nargs="+", default=CACHE_THRESHOLDS)
    parser.add_argument("--ag-exit-thresholds", type=float, nargs="+", default=AG_EXIT_THRESHOLDS)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="--quick / --timing")
    parser.add_argument("--cache-threshold", type=float, default=QUICK_CACHE_THRESHOLDS[0], help="--timing")
    parser.add_argument("--ag-exit-threshold", type=float, default=DEFAULT_AG_EXIT_THRESHOLD, help="--quick/--timing")
    parser.add_argument("--rounds", type=int, default=8, help="--timing rounds")
    args = parser.parse_args()
    every = args.every or (2 if args.quick else 1)
    world = runner.load_world()
    from guidance_kit.nodes.deediff import LOAD_NODE, load_heads
    from guidance_kit.toyworld.weights import DEEDIFF_JOINT

    heads = load_heads(args.heads or DEEDIFF_JOINT, LOAD_NODE)
    if args.probe:
        runner.emit(probe(world, heads, runner.prompt_set("dev", False)[::13], thresholds=args.thresholds))
        return
    if args.timing:
        runner.emit(interleaved_timing(world, heads, runner.prompt_set("validation", False)[0][0], args.threshold,
                                       args.cache_threshold, args.ag_exit_threshold, args.rounds))
        return
    out = {"cfg_scale": CFG_SCALE, "steps": STEPS, "seeds": SEEDS, "blocks_per_row": BLOCKS,
           "ag_threshold": AG_THRESHOLD, "every_nth_prompt": every, "heads": str(args.heads or DEEDIFF_JOINT.name),
           "adapters": heads.adapters is not None}
    if args.quick:
        threshold, ag_exit = args.threshold, args.ag_exit_threshold
    else:
        configurations = {"full": runner.cfg(CFG_SCALE)}
        configurations |= {f"exit_{t}": exit_config(heads, t) for t in args.thresholds}
        configurations |= {f"cache_{t}": cache_config(t) for t in args.cache_thresholds}
        configurations |= {f"ag_exit_{t}": exit_config(heads, t, AG_THRESHOLD) for t in args.ag_exit_thresholds}
        dev, _ = sweep(world, runner.prompt_set("dev", False)[::every], configurations)
        out["dev"] = dev
        threshold = float(choose(dev, [f"exit_{t}" for t in args.thresholds], TARGET).removeprefix("exit_"))
        ag_exit = float(choose(dev, [f"ag_exit_{t}" for t in args.ag_exit_thresholds], AG_TARGET
                               ).removeprefix("ag_exit_"))
        exit_blocks = dev[f"exit_{threshold}"]["blocks"]
        cache = min(args.cache_thresholds, key=lambda t: abs(dev[f"cache_{t}"]["blocks"] - exit_blocks))
    depth = DepthByStep()
    prompts = runner.prompt_set("validation", False)[::every]
    configurations = {"full": runner.cfg(CFG_SCALE), "exit": exit_config(heads, threshold, depth=depth),
                      "ag_exit": exit_config(heads, ag_exit, AG_THRESHOLD)}
    if heads.adapters is not None:  # the adapted full model: threshold 1.0, no row exits
        configurations["adapted"] = exit_config(heads, 1.0)
    if args.quick:
        configurations |= {f"cache_{t}": cache_config(t) for t in QUICK_CACHE_THRESHOLDS}
    else:
        configurations |= {"cache": cache_config(cache), "ag": ag_config(AG_THRESHOLD)}
    validation, _ = sweep(world, prompts, configurations)
    if args.quick:  # the peer at matched compute: the cache threshold whose blocks are closest to DeeDiff's
        cache = min(QUICK_CACHE_THRESHOLDS, key=lambda t: abs(validation[f"cache_{t}"]["blocks"] -
                                                              validation["exit"]["blocks"]))
        validation["cache"] = validation[f"cache_{cache}"]
    out["validation"] = validation
    full, exit_, peer, ag_exit_figures = (validation[k] for k in ("full", "exit", "cache", "ag_exit"))
    out.update(
        exit_threshold=threshold, cache_threshold=cache, ag_exit_threshold=ag_exit,
        full_blocks=full["blocks"], full_pass=full["pass"], full_seconds=full["seconds"],
        exit_blocks=exit_["blocks"], exit_pass=exit_["pass"], exit_blocks_saved=exit_["blocks_saved"],
        exit_pass_delta=exit_["pass_delta"], exit_pass_delta_se=exit_["pass_delta_se"],
        exit_seconds_ratio=exit_["seconds_ratio"], exit_depth_by_step=depth.mean_depth(),
        cache_blocks=peer["blocks"], cache_pass_at_matched=peer["pass"], cache_pass_delta=peer["pass_delta"],
        cache_pass_delta_se=peer["pass_delta_se"], cache_seconds_ratio=peer["seconds_ratio"],
        ag_exit_blocks=ag_exit_figures["blocks"], ag_exit_pass=ag_exit_figures["pass"],
        ag_exit_blocks_saved=ag_exit_figures["blocks_saved"], ag_exit_pass_delta=ag_exit_figures["pass_delta"],
        ag_exit_pass_delta_se=ag_exit_figures["pass_delta_se"], ag_exit_seconds_ratio=ag_exit_figures["seconds_ratio"],
        targets={"exit": TARGET, "ag_exit": AG_TARGET},
    )
    if "adapted" in validation:
        out.update(adapted_pass=validation["adapted"]["pass"], adapted_pass_delta=validation["adapted"]["pass_delta"],
                   adapted_pass_delta_se=validation["adapted"]["pass_delta_se"])
    if "ag" in validation:
        out.update(ag_blocks=validation["ag"]["blocks"], ag_pass=validation["ag"]["pass"])
    runner.emit(out)


if __name__ == "__main__":
    main()
