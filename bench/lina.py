"""LINA (after LINA, arXiv 2512.13290) on the toy world: targeted prompt guidance, the region-restricted latent
term, the causality-aware schedule, the best fixed setting from dev and LINA (auto), against CFG at equal rows.

Protocol (docs/lina.md):

1. **Search** (dev prompts, slice 0, relation and mirror kinds): every setting of ``GRID`` on every prompt with
   ``--dev-seeds`` images, scored per image by a pluggable scorer (``SCORERS``; default ``facts``: the oracle's
   share of facts right, denser than pass/fail).  Per prompt the best setting is the predictor's target; over all
   prompts the best non-CFG setting is "LINA fixed".
2. **Train** the predictor (``samplers.lina.fit_predictor``, through samplers/training.py) from each dev prompt's
   mean conditioning to its target; saved as ``--predictor`` (safetensors with identity metadata).
3. **Validation** (slice 1, never searched or trained on): CFG at the row budget of the most expensive setting
   (extra steps), prompt guidance only, latent term only, LINA fixed, LINA (auto) on relation and mirror prompts;
   CFG and LINA (auto) on single-object prompts (no-harm check).  Same prompts and noise everywhere: differences
   are paired.

The ablated prompt removes ``RELATION_WORDS`` (user-given words; the automatic ranking picks colours on this toy,
see docs/lina.md).  Results are cached per stage in ``--work`` so a stopped run resumes.  Last line: JSON.
"""
import argparse
import json
import math
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402

CFG_SCALE = 4.0
STEPS = 20
BOUNDARY = 0.2
RELATION_WORDS = "left of, right of, above, below"
KINDS = ("relation", "mirror")
# name -> (share or None for the base schedule, prompt strength, latent strength, window)
GRID = {
    "cfg": (None, 0.0, 0.0, 0.0),
    "prompt": (None, 2.0, 0.0, 0.3),
    "latent": (None, 0.0, 2.0, 0.3),
    "prompt_strong": (None, 4.0, 0.0, 0.5),
    "prompt_latent_schedule": (0.5, 2.0, 2.0, 0.3),
}
SCORERS = {
    "facts": lambda verdict: sum(v for k, v in verdict.items() if k != "pass") / max(1, len(verdict) - 1),
    "pass": lambda verdict: float(verdict["pass"]),
}


def ablated_for(world, prompt: str):
    """The prompt with its relation words removed (LINA Relation Prompt); itself when it has none."""
    from guidance_kit.nodes import lina
    from harness.executor import run_node

    if lina.without_phrases(prompt, RELATION_WORDS.split(", ")) == prompt:
        return world.encode(prompt)
    return run_node(lina.LINARelationPrompt, world.clip, prompt, RELATION_WORDS, 2)[0]


def base_share(world) -> float:
    from guidance_kit.samplers.lina import boundary_fraction
    from harness.sampling import sigmas_for

    sampling = world.model.get_model_object("model_sampling")
    return boundary_fraction(sigmas_for(world.model, STEPS, "simple"), float(sampling.percent_to_sigma(BOUNDARY)))


def manual(world, setting, prompts_by_text):
    """make_guider for one setting: the LINA Guider (its schedule share, or the base schedule's own share)."""
    from guidance_kit.nodes.lina import LINAGuider
    from harness.executor import run_node

    share, prompt_strength, latent_strength, window = setting
    share = base_share(world) if share is None else share

    def make(model, positive, negative):
        ablated = ablated_for(world, prompts_by_text[id(positive)])
        return run_node(LINAGuider, model, positive, negative, CFG_SCALE, ablated, prompt_strength, latent_strength,
                        window, share, BOUNDARY)[0]
    return make


def auto(world, predictor: str, prompts_by_text):
    from guidance_kit.nodes.lina import LINAAutoGuider
    from harness.executor import run_node

    def make(model, positive, negative):
        ablated = ablated_for(world, prompts_by_text[id(positive)])
        return run_node(LINAAutoGuider, model, positive, negative, CFG_SCALE, ablated, predictor, BOUNDARY)[0]
    return make


def text_index(world, prompts):
    """id(encoded positive) -> prompt text (the runner hands guiders the cached encodings)."""
    return {id(world.encode(prompt)): prompt for prompt, _ in prompts}


def rows_per_image(world, setting) -> int:
    """Model rows one image costs under ``setting``: 2 per step, plus 1 per step inside the window."""
    from guidance_kit.nodes.lina import LINASchedule

    share, prompt_strength, latent_strength, window = setting
    sigmas = LINASchedule.execute(world.model, "simple", STEPS, base_share(world) if share is None else share,
                                  BOUNDARY, 1.0)[0]
    if window <= 0 or (prompt_strength <= 0 and latent_strength <= 0):
        return 2 * STEPS
    window_sigma = float(world.model.get_model_object("model_sampling").percent_to_sigma(window))
    return 2 * STEPS + int((sigmas[:-1] >= window_sigma).sum())


def rate(values) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(mean * (1 - mean) / len(values)) if 0 <= mean <= 1 else 0.0


def summary(result, base=None) -> dict:
    out = {"rows": result.rows, "images": len(result.verdicts)}
    for kind in ("relation", "mirror", "single"):
        verdicts = [v for k, v in result.verdicts if k == kind]
        if not verdicts:
            continue
        out[f"{kind}_pass"], out[f"{kind}_pass_se"] = (round(x, 4) for x in rate([float(v["pass"]) for v in verdicts]))
        if kind == "mirror":
            out["implied_correct"] = round(rate([float(v["implied"]) for v in verdicts if "implied" in v])[0], 4)
        out[f"{kind}_rows_per_image"] = round(result.rows_per_image(kind), 2)
        if base is not None:
            differences = [float(mine["pass"]) - float(theirs["pass"]) for (k, mine), (_, theirs)
                           in zip(result.verdicts, base.verdicts) if k == kind]
            mean = sum(differences) / len(differences)
            variance = sum((d - mean) ** 2 for d in differences) / max(1, len(differences) - 1)
            out[f"{kind}_delta"] = round(mean, 4)
            out[f"{kind}_delta_se"] = round(math.sqrt(variance / len(differences)), 4)
    return out


def search(world, args) -> dict:
    """Every GRID setting on every dev prompt: per-prompt mean scores."""
    prompts = [(p, s) for p, s in runner.prompt_set("dev", args.quick) if s["kind"] in KINDS]
    index = text_index(world, prompts)
    scorer = SCORERS[args.scorer]
    scores = {}
    for name, setting in GRID.items():
        make = runner.cfg(CFG_SCALE) if name == "cfg" else manual(world, setting, index)
        result = runner.run(world, f"dev_{name}", make, prompts, seeds=args.dev_seeds, steps=STEPS,
                            scheduler="simple")
        per_image = [scorer(v) for _, v in result.verdicts]
        scores[name] = [per_image[i * args.dev_seeds:(i + 1) * args.dev_seeds] for i in range(len(prompts))]
        scores[name + "_summary"] = summary(result)
    return {"prompts": [p for p, _ in prompts], "scores": scores}


def setting_dict(world, setting) -> dict:
    share, prompt_strength, latent_strength, window = setting
    return {"share": base_share(world) if share is None else share, "prompt_strength": prompt_strength,
            "latent_strength": latent_strength, "window": window}


def train_predictor(world, found: dict, args) -> dict:
    import torch

    from guidance_kit.nodes.contract import model_identity
    from guidance_kit.samplers import lina, training

    targets, chosen = [], []
    for i, _ in enumerate(found["prompts"]):
        best = lina.best_setting({name: found["scores"][name][i] for name in GRID})
        chosen.append(best)
        targets.append(lina.unit_parameters(setting_dict(world, GRID[best])))
    features = torch.cat([lina.conditioning_features(world.encode(p)[0][0]) for p in found["prompts"]])
    settings = training.TrainSettings(steps=args.train_steps, batch_size=16, lr=3e-3, seed=0)
    with training.grad_mode():
        predictor, identity, result = lina.fit_predictor(features, torch.stack(targets), settings,
                                                         model=model_identity(world.model))
    training.save_trained(args.predictor, {"predictor": predictor}, lina.PREDICTOR_FORMAT, identity, settings, result)
    return {"targets": chosen, "final_loss": result.final_loss}


def validate(world, fixed: str, args) -> dict:
    prompts = [(p, s) for p, s in runner.prompt_set("validation", args.quick) if s["kind"] in KINDS]
    singles = [(p, s) for p, s in runner.prompt_set("validation", args.quick) if s["kind"] == "single"]
    index = text_index(world, prompts + singles)
    settings = {"prompt": GRID["prompt"], "latent": GRID["latent"], "fixed": GRID[fixed]}
    budget = max(rows_per_image(world, s) for s in GRID.values())
    cfg_steps = math.ceil(budget / 2)
    predictor = args.predictor.name
    base = runner.run(world, "cfg_equal_rows", runner.cfg(CFG_SCALE), prompts + singles, seeds=args.seeds,
                      steps=cfg_steps, scheduler="simple")
    table = {"cfg_equal_rows": summary(base, base) | {"steps": cfg_steps}}
    for name, setting in settings.items():
        result = runner.run(world, name, manual(world, setting, index), prompts, seeds=args.seeds, steps=STEPS,
                            scheduler="simple")
        table[name] = summary(result, base)
    result = runner.run(world, "auto", auto(world, predictor, index), prompts + singles, seeds=args.seeds,
                        steps=STEPS, scheduler="simple")
    table["auto"] = summary(result, base)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="images per validation prompt")
    parser.add_argument("--dev-seeds", type=int, default=2, help="images per dev prompt and setting (search)")
    parser.add_argument("--scorer", choices=sorted(SCORERS), default="facts")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--stage", choices=("search", "validate", "all"), default="all")
    parser.add_argument("--work", type=Path, default=runner.REPO / "out" / "lina")
    parser.add_argument("--quick", action="store_true", help="every other prompt (smoke runs only)")
    args = parser.parse_args()
    world = runner.load_world()
    from guidance_kit.nodes.contract import model_files

    args.predictor = model_files.SHIPPED["lina"][model_files.TOY_LINA_PREDICTOR]  # trained here, then shipped
    args.work.mkdir(parents=True, exist_ok=True)
    found_path = args.work / f"search_{args.scorer}_{args.dev_seeds}{'_quick' if args.quick else ''}.json"
    if found_path.exists():
        found = json.loads(found_path.read_text())
    else:
        found = search(world, args)
        found_path.write_text(json.dumps(found))
    means = {name: sum(map(sum, found["scores"][name])) / sum(map(len, found["scores"][name])) for name in GRID}
    fixed = max((name for name in GRID if name != "cfg"), key=lambda name: means[name])
    trained = train_predictor(world, found, args)
    print(f"dev scores {means}; fixed {fixed}; targets {trained}", file=sys.stderr)
    if args.stage == "search":
        return
    table = validate(world, fixed, args)
    for name, row in table.items():
        print(f"  {name:16s} {row}", file=sys.stderr)
    base, lina_row, auto_row = table["cfg_equal_rows"], table["fixed"], table["auto"]
    runner.emit({
        "world": "toy v1", "steps": STEPS, "cfg": CFG_SCALE, "seeds": args.seeds, "dev_seeds": args.dev_seeds,
        "scorer": args.scorer, "fixed_setting": fixed, "fixed_parameters": setting_dict(world, GRID[fixed]),
        "dev_scores": means, "predictor_targets": trained["targets"], "validation": table,
        "base_relation": base["relation_pass"], "lina_relation": lina_row["relation_pass"],
        "auto_relation": auto_row["relation_pass"], "base_implied": base["mirror_pass"],
        "lina_implied": lina_row["mirror_pass"], "auto_implied": auto_row["mirror_pass"],
        "single_pass_drop": round(base["single_pass"] - auto_row["single_pass"], 4),
        "rows_ratio": round(auto_row["rows"] / base["rows"], 4),
    })


if __name__ == "__main__":
    main()
