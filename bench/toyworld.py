"""The toy world's quality bar: plain CFG vs unguided sampling, judged by the oracle.

20 Euler steps (``simple`` schedule, i.e. sigmas linear from 1 to 0), CFG scale ``CFG_SCALE``;
4 images per prompt (--quick takes every other prompt).  Reports, on the
validation set (never tuned on): ``single_pass``, ``relation_pass``, ``implied_pass`` with CFG and
``uncond_single_pass`` with cfg 1, plus the dev-set figures and rows/blocks/time.

"Chance" (``<kind>_chance``): the oracle's pass rate for images that ignore the prompt, i.e.
generator scenes of random specs of the same kind judged against each validation prompt
(``CHANCE_SCENES`` per prompt, no model involved).
"""
import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402

CFG_SCALE = 4.0
CHANCE_SCENES = 200


def chance(prompts) -> dict:
    """{kind: pass rate of random same-kind generator scenes judged against the prompts' specs}."""
    import numpy as np

    from guidance_kit.toyworld import oracle, scenes

    rng, passed = np.random.default_rng(0), {}
    for _, spec in prompts:
        verdicts = [oracle.judge(scenes.sample_scene(rng, spec["kind"]).image, spec)["pass"]
                    for _ in range(CHANCE_SCENES)]
        passed.setdefault(spec["kind"], []).extend(verdicts)
    return {kind: float(np.mean(verdicts)) for kind, verdicts in passed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="half the prompts (about 1.5 minutes)")
    parser.add_argument("--cfg", type=float, default=CFG_SCALE)
    args = parser.parse_args()
    seeds = 4  # relation prompts pass ~1 in 10: fewer images would read as 0
    world = runner.load_world()
    figures = {"cfg_scale": args.cfg, "seeds": seeds, "steps": 20}
    for split in ("dev", "validation"):
        prompts = runner.prompt_set(split, args.quick)
        guided = runner.run(world, f"cfg{args.cfg:g}-{split}", runner.cfg(args.cfg), prompts, seeds=seeds)
        singles = [p for p in prompts if p[1]["kind"] == "single"]
        unguided = runner.run(world, f"cfg1-{split}", runner.cfg(1.0), singles, seeds=seeds)
        prefix = "" if split == "validation" else "dev_"
        figures.update({
            f"{prefix}single_pass": guided.pass_rate("single"),
            f"{prefix}relation_pass": guided.pass_rate("relation"),
            f"{prefix}implied_pass": guided.pass_rate("mirror"),
            f"{prefix}uncond_single_pass": unguided.pass_rate("single"),
            f"{prefix}cfg_rows": guided.rows,
            f"{prefix}cfg_blocks": guided.blocks,
            f"{prefix}cfg_seconds": round(guided.seconds, 2),
            f"{prefix}images": len(guided.verdicts),
        })
        for fact in runner.FACTS:
            figures[f"{prefix}{fact}_correct"] = guided.pass_rate(fact=fact)
    random_images = chance(runner.prompt_set("validation", args.quick))
    figures.update({"single_chance": random_images["single"], "relation_chance": random_images["relation"],
                    "implied_chance": random_images["mirror"]})
    runner.emit(figures)


if __name__ == "__main__":
    main()
