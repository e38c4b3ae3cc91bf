"""Adaptive Guidance (learned) on the toy world: a calibrated per-sample switch policy against CFG,
Adaptive Guidance, the batch-global peer rule and the hindsight bound, at equal model rows.

Protocol (toy world v1, euler, scheduler "simple", ``STEPS`` steps, ``SEEDS`` images per prompt,
CFG scale ``CFG_SCALE``; every ``STRIDE``-th prompt of each set):

* **Calibration** on the *dev* prompts with other noise (seed ``CALIBRATION_SEED``): per prompt the
  node's own ``record_outcomes`` (a full-CFG run recording the online features, then the conditional
  alone from the latent of every switch step in ``GRID``), labels at the tolerance, the logistic
  fit.  Design choices (tolerance, feature set, the reported trade-off value) are made on dev by
  leave-prompts-out cross-validation (``FOLDS`` folds); validation is never tuned on.
* **Validation** (seed 0 + prompt index, the noise of bench/adaptive_guidance.py): the same recording,
  with every branch image judged by the oracle.  A switch rule only sees the full-CFG trajectory up
  to its switch, so the image of "switch after k CFG steps" is the branch image k: every rule is
  scored on the same images (its switch step rounded up to ``GRID`` ∪ {STEPS}; rows = STEPS + k per
  image, CFG = 2·STEPS).  Rules: CFG; AG at its default γ̄ and at the γ̄ matching the learned rows
  (per-sample guidance cosine); the peer rule (one cosine for the whole batch, as asagi4's guider,
  all images switch together) at matched rows; learned AG at a sweep of the threshold; the
  hindsight bound (per image, the smallest grid step after which the oracle verdict equals CFG's).
  ``--live`` also runs the Adaptive Guidance (learned) guider itself on the validation prompts at the
  chosen threshold (rows counted by the run record; pass by the oracle).
* Pass rates come with the paired difference to CFG (same prompts and noise) and its standard error.
* **Tiny real architecture** (``tiny_check``): the tiny SD1.5-style ε model (random weights, no VAE:
  the distance is on the latent), calibrated on a few word prompts, reported on others: rows and
  distance to the CFG latent for the learned policy vs AG at matched rows.

Last line: JSON.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402

CFG_SCALE = 4.0
STEPS = 20
SEEDS = 4
STRIDE = 6
CALIBRATION_SEED = 10_000
GRID = (1, 2, 4, 8, 12)
FOLDS = 4
TOLERANCES = (0.004, 0.006, 0.008, 0.01, 0.015)
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
AG_DEFAULT = 0.99
COSINE_SWEEP = tuple(round(0.9 + 0.0005 * i, 4) for i in range(201))
TARGET = {"saving": 0.35, "tolerance": 0.01}
FEATURE_SETS = {"all": None, "no_prompt": "dynamic", "progress_and_prompt": ("progress",),
                "no_progress": "no_progress", "cosine_only": ("progress", "cosine", "cosine_change", "min_cosine"),
                "difference_only": ("progress", "difference_norm", "difference_change", "max_difference_norm")}


# ---------------------------------------------------------------- recording

def record_splits(world, splits: dict, cache: Path | None, stride: int = STRIDE, record: bool = True) -> dict:
    """{split: records}: per prompt of each split (every ``stride``-th) in ``splits`` ({split: noise seed}),
    ``record_outcomes`` with the oracle verdicts of every branch; the splits take turns prompt by prompt
    and each prompt is saved to ``cache`` as it is done (resumable; ``record=False`` only reads the cache)."""
    from guidance_kit.nodes import learned_ag as node
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from guidance_kit.toyworld import oracle

    prompts = {split: runner.prompt_set(split, False)[::stride] for split in splits}
    paths = {split: cache / f"{split}_{seed}_s{stride}.pt" if cache else None for split, seed in splits.items()}
    records = {split: torch.load(path) if path and path.exists() else [] for split, path in paths.items()}
    for index in range(max(map(len, prompts.values())) if record else 0):
        for split, seed in splits.items():
            if index < len(records[split]) or index >= len(prompts[split]):
                continue
            prompt, spec = prompts[split][index]
            start = time.perf_counter()
            outcome = node.record_outcomes(world.model, world.vae, world.encode(prompt), world.encode(""),
                                           ToyWorldEmptyLatent.execute(SEEDS)[0], seed=seed + index * stride,
                                           steps=STEPS, cfg=CFG_SCALE, sampler_name="euler", scheduler="simple",
                                           switch_steps=GRID, keep_images=True)
            outcome["seconds"] = time.perf_counter() - start
            outcome["kind"] = spec["kind"]
            outcome["verdicts"] = {k: [oracle.judge(image.numpy(), spec)["pass"] for image in images]
                                   for k, images in outcome.pop("branch_images").items()}
            outcome["verdicts"][STEPS] = [oracle.judge(image.numpy(), spec)["pass"] for image in outcome.pop("images")]
            records[split].append(outcome)
            print(f"\r{split}: {index + 1}/{len(prompts[split])} prompts", end="", file=sys.stderr, flush=True)
            if paths[split]:
                torch.save(records[split], paths[split])
    return records


# ---------------------------------------------------------------- rules scored on the recorded branches

def on_grid(steps: torch.Tensor) -> torch.Tensor:
    """Switch steps rounded up to the searched grid (or plain CFG)."""
    grid = torch.tensor([*GRID, STEPS])
    return grid[torch.searchsorted(grid, steps.clamp(max=STEPS))]


def score(records: list[dict], steps_per_image: torch.Tensor, reference: dict | None = None) -> dict:
    """Rows, pass, paired difference to CFG, pass per kind and distance to CFG when image i keeps CFG for
    ``steps_per_image[i]`` steps (rounded up to the grid)."""
    steps = on_grid(steps_per_image)
    passed, kinds, distance = [], [], []
    index = 0
    for record in records:
        for image in range(record["distances"].shape[0]):
            k = int(steps[index])
            passed.append(int(record["verdicts"][k][image]))
            distance.append(float(record["distances"][image, k]))
            kinds.append(record["kind"])
            index += 1
    rows = int((STEPS + steps).sum())
    out = {"rows": rows, "rows_saved": round(1 - rows / (2 * STEPS * len(passed)), 4),
           "pass": round(sum(passed) / len(passed), 4), "distance_to_cfg": round(sum(distance) / len(distance), 5),
           "mean_cfg_steps": round(float(steps.float().mean()), 2), "passed": passed}
    for kind in sorted(set(kinds)):
        chosen = [p for p, k in zip(passed, kinds) if k == kind]
        out[f"{kind}_pass"] = round(sum(chosen) / len(chosen), 4)
        out[f"{kind}_cfg_steps"] = round(float(steps[[k == kind for k in kinds]].float().mean()), 2)
    if reference is not None:
        differences = [a - b for a, b in zip(passed, reference["passed"])]
        mean = sum(differences) / len(differences)
        variance = sum((d - mean) ** 2 for d in differences) / max(1, len(differences) - 1)
        out.update(pass_delta=round(mean, 4), pass_delta_se=round(math.sqrt(variance / len(differences)), 4),
                   gained=differences.count(1), lost=differences.count(-1))
    return out


def public(figures: dict) -> dict:
    return {key: value for key, value in figures.items() if key != "passed"}


def first_reaching(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """[..., E] per-evaluation values -> CFG steps when switching after the first value ≥ threshold."""
    from guidance_kit.samplers.learned_ag import switch_steps

    return switch_steps(values, threshold)


def ag_steps(records, threshold: float) -> torch.Tensor:
    """AG: per image, the per-sample guidance cosine (feature 1) reaching γ̄."""
    return torch.cat([first_reaching(r["features"][:, :, 1].T, threshold) for r in records])


def peer_steps(records, threshold: float) -> torch.Tensor:
    """The batch-global rule: one cosine for the batch, every image of the prompt switches together."""
    return torch.cat([first_reaching(r["batch_cosine"][None], threshold).expand(r["distances"].shape[0])
                      for r in records])


def hindsight_steps(records) -> torch.Tensor:
    """Per image, the smallest grid step from which the oracle verdict equals CFG's at every later step."""
    out = []
    for record in records:
        grid = [*GRID, STEPS]
        for image in range(record["distances"].shape[0]):
            verdicts = [record["verdicts"][k][image] for k in grid]
            index = len(grid) - 1
            while index > 0 and verdicts[index - 1] == verdicts[-1]:
                index -= 1
            out.append(grid[index])
    return torch.tensor(out)


def cfg_steps(records) -> torch.Tensor:
    return torch.full((sum(r["distances"].shape[0] for r in records),), STEPS)


def matched(records, rule, rows: int, reference) -> dict:
    """The rule (a function of a cosine threshold) at the threshold whose rows are closest to ``rows``."""
    best = min(COSINE_SWEEP, key=lambda t: (abs(score(records, rule(records, t))["rows"] - rows), -t))
    return {"threshold": best, **score(records, rule(records, best), reference)}


# ---------------------------------------------------------------- the policy, fitted offline

def columns(feature_set, width: int) -> list[int]:
    from guidance_kit.samplers.learned_ag import DYNAMIC_FEATURES

    dynamic = len(DYNAMIC_FEATURES)
    if feature_set is None:
        return list(range(width))
    if feature_set == "dynamic":
        return list(range(dynamic))
    if feature_set == "no_progress":
        return list(range(1, width))
    return [DYNAMIC_FEATURES.index(name) for name in feature_set] + list(range(dynamic, width))


class OfflinePolicy:
    """The node's policy fitting (``training_set`` + ``fit_logistic``) on a column subset."""

    def __init__(self, records, tolerance: float, feature_set=None, directions: int = 4):
        from guidance_kit.nodes.learned_ag import L2, training_set
        from guidance_kit.samplers import learned_ag as lag

        prompts = torch.cat([r["prompt"][:1] for r in records])
        self.prompt_mean, self.prompt_basis = lag.principal_directions(prompts, directions)
        features, targets = training_set(records, tolerance, self.prompt_mean, self.prompt_basis)
        self.columns = columns(feature_set, features.shape[1])
        self.weights, self.bias, self.mean, self.std = lag.fit_logistic(features[:, self.columns], targets, l2=L2)

    def probabilities(self, record) -> torch.Tensor:
        """p(safe) [B, E] over the record's evaluations."""
        from guidance_kit.samplers.learned_ag import project_prompts

        prompt = project_prompts(record["prompt"], self.prompt_mean, self.prompt_basis)
        rows = torch.cat([record["features"], prompt[None].expand(record["features"].shape[0], -1, -1)], dim=2)
        z = (rows[..., self.columns] - self.mean) / self.std
        return torch.sigmoid(z @ self.weights + self.bias).T

    def steps(self, records, threshold: float) -> torch.Tensor:
        from guidance_kit.samplers.learned_ag import switch_steps

        return torch.cat([switch_steps(self.probabilities(r), threshold) for r in records])

    def log_loss(self, records, tolerance: float) -> float:
        from guidance_kit.samplers.learned_ag import earliest_safe_step, safe_targets

        total, count = 0.0, 0
        for record in records:
            p = self.probabilities(record).clamp(1e-6, 1 - 1e-6)
            labels = earliest_safe_step(record["distances"], tolerance)
            y = safe_targets(record["steps"][None].expand(len(labels), -1), labels[:, None])
            total += float(-(y * p.log() + (1 - y) * (1 - p).log()).sum())
            count += y.numel()
        return total / count


def cross_validate(records, tolerance: float, feature_set=None) -> dict:
    """Leave-prompts-out folds on dev: held-out log loss and, per threshold, the held-out rule's figures."""
    folds = [list(range(f, len(records), FOLDS)) for f in range(FOLDS)]
    steps = {t: torch.zeros(0, dtype=torch.long) for t in THRESHOLDS}
    order, loss = [], 0.0
    for fold in folds:
        train = [r for i, r in enumerate(records) if i not in fold]
        held = [records[i] for i in fold]
        policy = OfflinePolicy(train, tolerance, feature_set)
        loss += policy.log_loss(held, tolerance) / FOLDS
        for t in THRESHOLDS:
            steps[t] = torch.cat([steps[t], policy.steps(held, t)])
        order += fold
    reordered = [records[i] for i in order]
    reference = score(reordered, cfg_steps(reordered))
    return {"log_loss": round(loss, 4),
            "by_threshold": {t: public(score(reordered, steps[t], reference)) for t in THRESHOLDS}}


def choose_threshold(study: dict) -> float:
    """The most saving threshold whose held-out dev pass stays within the target of CFG (else the safest)."""
    table = study["by_threshold"]
    ok = [t for t in THRESHOLDS if table[t]["pass_delta"] >= -TARGET["tolerance"] - 1e-9]
    return max(ok, key=lambda t: table[t]["rows_saved"]) if ok else max(THRESHOLDS)


def label_agreement(records, tolerance: float) -> float:
    """How often "switch step k is within tolerance (and stays so)" agrees with "the oracle's verdict at k
    equals the CFG verdict", over every image and searched k."""
    from guidance_kit.samplers.learned_ag import earliest_safe_step

    agree = total = 0
    for record in records:
        labels = earliest_safe_step(record["distances"], tolerance)
        for k in GRID:
            same = torch.tensor(record["verdicts"][k]) == torch.tensor(record["verdicts"][STEPS])
            agree += int(((k >= labels) == same).sum())
            total += len(labels)
    return round(agree / total, 4)


# ---------------------------------------------------------------- tiny real architecture

class LatentAsImage:
    """A VAE stand-in for models without one: the latent itself, channels last."""

    def decode(self, samples):
        return samples.movedim(1, -1)


def tiny_check(prompts: int = 6, seeds: int = 2, steps: int = 10) -> dict:
    """Tiny SD1.5-style ε model: calibrate on word prompts, report rows and latent distance to CFG on others."""
    from guidance_kit.nodes import learned_ag as node
    from guidance_kit.samplers.learned_ag import project_prompts, switch_steps
    from harness import tiny_models

    tiny = tiny_models.build("sd15_eps")
    clip = tiny_models.WordClip(tiny)
    words = [f"tiny prompt number {i}" for i in range(2 * prompts)]
    kwargs = {"steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
    start = time.perf_counter()
    calibration = node.collect(tiny.patcher, LatentAsImage(), [clip.encode_from_tokens_scheduled(w)
                                                               for w in words[:prompts]],
                               tiny.negative, tiny.empty_latent(seeds), seed=CALIBRATION_SEED, **kwargs)
    scale = float(torch.cat([r["distances"][:, 1] for r in calibration]).mean())
    tolerance = 0.25 * scale
    policy = node.fit_policy(tiny.patcher, calibration, tolerance=tolerance, seconds=time.perf_counter() - start,
                             **kwargs)
    held = node.collect(tiny.patcher, LatentAsImage(), [clip.encode_from_tokens_scheduled(w) for w in words[prompts:]],
                        tiny.negative, tiny.empty_latent(seeds), seed=0, **kwargs)

    def figures(steps_per_image):
        steps_per_image = steps_per_image.clamp(max=steps)
        distances = torch.cat([r["distances"] for r in held])
        chosen = distances.gather(1, steps_per_image[:, None]).squeeze(1)
        return {"rows_saved": round(1 - float((steps + steps_per_image).sum()) / (2 * steps * len(chosen)), 4),
                "distance_to_cfg": round(float(chosen.mean()), 5)}

    def learned(t):
        chosen = []
        for record in held:
            prompt = project_prompts(record["prompt"], policy.prompt_mean, policy.prompt_basis)
            rows = torch.cat([record["features"], prompt[None].expand(record["features"].shape[0], -1, -1)], dim=2)
            chosen.append(switch_steps(policy.probability(rows).T, t))
        return torch.cat(chosen)

    out = {"tolerance": round(tolerance, 5), "calibration_seconds": policy.info["calibration_seconds"],
           "mean_safe_step": policy.info["mean_safe_step"]}
    for t in (0.5, 0.8):
        mine = figures(learned(t))
        target = (1 - mine["rows_saved"]) * 2 * steps - steps
        ag_threshold = min(COSINE_SWEEP, key=lambda c: abs(float(torch.cat(
            [first_reaching(r["features"][:, :, 1].T, c) for r in held]).float().mean()) - target))
        ag = figures(torch.cat([first_reaching(r["features"][:, :, 1].T, ag_threshold) for r in held]))
        out[f"learned_{t}"] = mine
        out[f"ag_at_learned_{t}_rows"] = {"threshold": ag_threshold, **ag}
    return out


# ---------------------------------------------------------------- live check

def live(world, policy, threshold: float) -> dict:
    """The Adaptive Guidance (learned) guider itself on the validation prompts (rows from the run record)."""
    from guidance_kit.nodes.learned_ag import LearnedAGGuider

    prompts = runner.prompt_set("validation", False)
    chosen = [prompts[i] for i in range(0, len(prompts), STRIDE)]
    results = {}
    for name, make in (("cfg", runner.cfg(CFG_SCALE)),
                       ("learned", lambda m, p, n: LearnedAGGuider.execute(m, p, n, CFG_SCALE, policy, threshold)[0])):
        result = runner.Result(name)
        for index, item in zip(range(0, len(prompts), STRIDE), chosen):
            part = runner.run(world, name, make, [item], seeds=SEEDS, steps=STEPS, base_seed=index, progress=False)
            result.rows += part.rows
            result.verdicts += part.verdicts
            result.images += part.images
        results[name] = result
    return {"rows": results["learned"].rows, "cfg_rows": results["cfg"].rows, "pass": results["learned"].pass_rate(),
            "cfg_pass": results["cfg"].pass_rate(), "distance_to_cfg": round(results["learned"].distance_to(
                results["cfg"]), 5)}


# ---------------------------------------------------------------- main

def analyse(dev: list[dict], validation: list[dict], recording_seconds: float) -> dict:
    """Design choices on dev (leave-prompts-out), then every rule scored on validation."""
    # design choices on dev (leave-prompts-out)
    from guidance_kit.samplers.learned_ag import monotone_fraction

    searched = torch.cat([r["distances"][:, [*GRID, STEPS]] for r in dev])
    tolerance_study = {tol: {"label_oracle_agreement": label_agreement(dev, tol),
                             "monotone_fraction": round(monotone_fraction(searched, tol), 4),
                             **cross_validate(dev, tol)} for tol in TOLERANCES}

    def dev_merit(study):
        table = study["by_threshold"][choose_threshold(study)]
        return (table["pass_delta"] >= -TARGET["tolerance"] - 1e-9, table["rows_saved"], -study["log_loss"])

    tolerance = max(TOLERANCES, key=lambda tol: dev_merit(tolerance_study[tol]))
    feature_study = {name: cross_validate(dev, tolerance, columns_spec) for name, columns_spec in FEATURE_SETS.items()}
    feature_set = max(FEATURE_SETS, key=lambda name: dev_merit(feature_study[name]))
    threshold = choose_threshold(feature_study[feature_set])

    start = time.perf_counter()
    policy = OfflinePolicy(dev, tolerance, FEATURE_SETS[feature_set])
    fit_seconds = time.perf_counter() - start

    reference = score(validation, cfg_steps(validation))
    sweep = {t: score(validation, policy.steps(validation, t), reference) for t in THRESHOLDS}
    chosen = sweep[threshold]
    ag_default = score(validation, ag_steps(validation, AG_DEFAULT), reference)
    ag_matched = matched(validation, ag_steps, chosen["rows"], reference)
    peer_matched = matched(validation, peer_steps, chosen["rows"], reference)
    hindsight = score(validation, hindsight_steps(validation), reference)
    out = {
        "protocol": {"world": "toy v1 (default)", "steps": STEPS, "seeds": SEEDS, "cfg_scale": CFG_SCALE,
                     "stride": STRIDE, "grid": list(GRID), "dev_prompts": len(dev),
                     "validation_prompts": len(validation), "images": len(reference["passed"])},
        "tolerance": tolerance, "feature_set": feature_set, "threshold": threshold,
        "cfg_rows": reference["rows"], "cfg_pass": reference["pass"],
        "learned_rows": chosen["rows"], "learned_pass": chosen["pass"], "learned_rows_saved": chosen["rows_saved"],
        "learned_pass_delta": chosen["pass_delta"], "learned_pass_delta_se": chosen["pass_delta_se"],
        "ag_pass_at_learned_rows": ag_matched["pass"], "peer_pass_at_learned_rows": peer_matched["pass"],
        "calibration_seconds": round(recording_seconds + fit_seconds, 2),
        "cfg": public(reference), "learned": public(chosen), "ag_default": public(ag_default),
        "ag_at_learned_rows": public(ag_matched), "peer_at_learned_rows": public(peer_matched),
        "hindsight": public(hindsight), "learned_sweep": {t: public(f) for t, f in sweep.items()},
        "learned_minus_ag_at_rows": paired(chosen, ag_matched), "learned_minus_peer_at_rows": paired(chosen,
                                                                                                     peer_matched),
        "dev_tolerance_study": tolerance_study, "dev_feature_study": feature_study,
    }
    out["targets"] = {"rows_saved_ge_35pct": chosen["rows_saved"] >= TARGET["saving"],
                      "pass_within_1pt": chosen["pass"] >= reference["pass"] - TARGET["tolerance"] - 1e-9,
                      "beats_ag_at_rows": chosen["pass"] > ag_matched["pass"],
                      "beats_peer_at_rows": chosen["pass"] > peer_matched["pass"]}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, help="folder for the recorded branches (resumable)")
    parser.add_argument("--live", action="store_true", help="also run the guider itself on validation")
    parser.add_argument("--save-policy", type=Path, help="write the policy fitted on all dev records here")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny real-architecture check")
    parser.add_argument("--cached-only", action="store_true",
                        help="analyse only the prompts already recorded in --cache (a partial run: say so)")
    parser.add_argument("--quick", action="store_true", help="smoke run: every 13th prompt, a smaller tiny check")
    args = parser.parse_args(argv)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)

    world = runner.load_world()
    stride = 13 if args.quick else STRIDE
    records = record_splits(world, {"dev": CALIBRATION_SEED, "validation": 0}, args.cache, stride,
                            record=not args.cached_only)
    dev, validation = records["dev"], records["validation"]
    recording_seconds = sum(r["seconds"] for r in dev)

    out = analyse(dev, validation, recording_seconds)
    out["quick"] = args.quick
    out["cached_only"] = args.cached_only
    out["protocol"]["stride"] = stride
    if args.save_policy or args.live:
        from guidance_kit.nodes.learned_ag import fit_policy

        node_policy = fit_policy(world.model, dev, steps=STEPS, cfg=CFG_SCALE, sampler_name="euler",
                                 scheduler="simple", tolerance=out["tolerance"], seconds=recording_seconds)
        node_policy.info["default_threshold"] = out["threshold"]
        if args.save_policy:
            node_policy.save(args.save_policy)
        if args.live:
            out["live"] = live(world, node_policy, out["threshold"])
    if not args.no_tiny:
        out["tiny_sd15_eps"] = tiny_check(*((2, 1, 6) if args.quick else ()))
    runner.emit(out)


def paired(a: dict, b: dict) -> dict:
    """Paired pass difference a − b (same images) and its standard error."""
    differences = [x - y for x, y in zip(a["passed"], b["passed"])]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / max(1, len(differences) - 1)
    return {"delta": round(mean, 4), "se": round(math.sqrt(variance / len(differences)), 4)}


if __name__ == "__main__":
    main()
