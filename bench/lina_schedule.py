"""Causality-Aware Schedule (after LINA) on the toy world: relation prompts' pass rate at a fixed step budget.

Plain CFG (ComfyUI's CFGGuider, scale ``CFG_SCALE``, euler, ``STEPS`` steps) on the base ``simple`` schedule
against the same guider on the LINA schedule (``nodes/lina.py``, boundary ``BOUNDARY`` of the way into denoising)
at the shares of ``SHARES``.  The share is chosen on the dev relation prompts (highest pass rate, ties to the
first listed); validation figures are reported for that choice only.  Same prompts and noise for every
configuration, so the difference to the base is paired: images gained, lost, and the difference's standard
error.  Equal model rows by construction (same steps, same guider).

Last line: JSON.
"""
import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402

CFG_SCALE = 4.0
STEPS = 20
SEEDS = 16
BOUNDARY = 0.2
SHARES = (0.35, 0.5, 0.65)


def lina_sigmas(world, share: float):
    from guidance_kit.nodes.lina import LINASchedule

    return LINASchedule.execute(world.model, "simple", STEPS, share, BOUNDARY, 1.0)[0]


def base_share(world) -> float:
    """The base schedule's own share of the steps before the boundary (u_b of samplers/lina.py)."""
    from guidance_kit.samplers.lina import boundary_fraction
    from harness.sampling import sigmas_for

    sampling = world.model.get_model_object("model_sampling")
    return boundary_fraction(sigmas_for(world.model, STEPS, "simple"), float(sampling.percent_to_sigma(BOUNDARY)))


def paired(result, base) -> dict:
    """Pass rate of ``result`` and its paired difference to ``base`` (same prompts and noise) with its SE."""
    differences = [int(mine["pass"]) - int(theirs["pass"])
                   for (_, mine), (_, theirs) in zip(result.verdicts, base.verdicts)]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / max(1, len(differences) - 1)
    rate = result.pass_rate()
    return {"pass": round(rate, 4), "pass_se": round((rate * (1 - rate) / len(differences)) ** 0.5, 4),
            "relation_correct": round(result.pass_rate(fact="relation"), 4),
            "delta": round(mean, 4), "delta_se": round((variance / len(differences)) ** 0.5, 4),
            "gained": differences.count(1), "lost": differences.count(-1), "rows": result.rows}


def measure(world, prompts, seeds: int, shares) -> dict:
    base = runner.run(world, "base", runner.cfg(CFG_SCALE), prompts, seeds=seeds, steps=STEPS)
    table = {"base": paired(base, base)}
    for share in shares:
        result = runner.run(world, f"lina_{share}", runner.cfg(CFG_SCALE), prompts, seeds=seeds, steps=STEPS,
                            sigmas=lina_sigmas(world, share))
        table[f"lina_{share}"] = paired(result, base)
    return table


def relation_prompts(name: str, quick: bool):
    return [(prompt, spec) for prompt, spec in runner.prompt_set(name, quick) if spec["kind"] == "relation"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--quick", action="store_true", help="every other prompt")
    args = parser.parse_args()
    world = runner.load_world()
    dev = measure(world, relation_prompts("dev", args.quick), args.seeds, SHARES)
    chosen = max(SHARES, key=lambda share: dev[f"lina_{share}"]["pass"])
    validation = measure(world, relation_prompts("validation", args.quick), args.seeds, (chosen,))
    for split, table in (("dev", dev), ("validation", validation)):
        print(f"{split}:", file=sys.stderr)
        for name, row in table.items():
            print(f"  {name:10s} pass {row['pass']:.3f} ± {row['pass_se']:.3f}  delta {row['delta']:+.3f} ± "
                  f"{row['delta_se']:.3f} (+{row['gained']} -{row['lost']})", file=sys.stderr)
    runner.emit({"steps": STEPS, "cfg": CFG_SCALE, "boundary": BOUNDARY, "seeds": args.seeds, "chosen_share": chosen,
                 "base_share": round(base_share(world), 4), "dev": dev, "validation": validation,
                 "base_relation": validation["base"]["pass"], "lina_relation": validation[f"lina_{chosen}"]["pass"],
                 "lina_relation_delta": validation[f"lina_{chosen}"]["delta"],
                 "lina_relation_delta_se": validation[f"lina_{chosen}"]["delta_se"]})


if __name__ == "__main__":
    main()
