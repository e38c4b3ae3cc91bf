"""How early could each image drop its unconditional?  A hindsight bound for Adaptive Guidance.

Every validation image is sampled with CFG on its first k steps and the conditional alone after,
for every k = 0 … ``STEPS`` (k = STEPS is plain CFG, k = 0 is cfg 1; same prompts and noise as
bench/adaptive_guidance.py).  Any per-sample switch rule, AG's cosine included, picks one k per
image, so these runs contain every outcome such a rule can reach.  Per image:

* ``stable`` switch step: the smallest k from which the oracle's verdict equals the CFG verdict for
  every later k (the image's outcome no longer depends on when guidance stops);
* ``luckiest`` switch step: the smallest k whose image passes (k = 0 if none does), i.e. a rule
  that knows the oracle's answer and exploits images that pass by chance without guidance.

Rows saved by a choice = mean over images of (STEPS − k) / (2 · STEPS).  The stable choice keeps
exactly CFG's pass rate; it is the saving a rule can reach at parity without relying on verdicts
that flip back and forth with k.  Also reported: the fixed-k frontier (pass rate per k), the mean
stable step per prompt kind, and, for comparison, the mean number of CFG steps per image and kind
that Adaptive Guidance gives at the thresholds ``AG_THRESHOLDS`` (rows per image − STEPS).

Last line: JSON.
"""
import argparse
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402
from adaptive_guidance import AG_TARGET, CFG_SCALE, DEFAULT_AG_THRESHOLD, SEEDS, STEPS, ag, window  # noqa: E402

AG_THRESHOLDS = (DEFAULT_AG_THRESHOLD, 0.99)


def stable_step(verdicts: list[bool]) -> int:
    """Smallest index i with verdicts[i'] == verdicts[-1] for every i' >= i."""
    index = len(verdicts) - 1
    while index > 0 and verdicts[index - 1] == verdicts[-1]:
        index -= 1
    return index


def luckiest_step(verdicts: list[bool]) -> int:
    """Smallest index whose verdict passes (0 if none does)."""
    return next((index for index, passed in enumerate(verdicts) if passed), 0)


def choice_figures(chosen: list[int], verdicts: list[list[bool]], switch_steps: list[int]) -> dict:
    """Rows saved, pass rate and mean switch step when image i switches at switch_steps[chosen[i]]."""
    steps = [switch_steps[index] for index in chosen]
    passed = [per_k[index] for per_k, index in zip(verdicts, chosen)]
    return {"rows_saved": round(sum(STEPS - k for k in steps) / (2 * STEPS * len(steps)), 4),
            "pass": round(sum(passed) / len(passed), 4),
            "mean_switch_step": round(sum(steps) / len(steps), 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="half the validation prompts, k in steps of 2")
    args = parser.parse_args(argv)
    switch_steps = list(range(0, STEPS + 1, 2 if args.quick else 1))

    world = runner.load_world()
    prompts = runner.prompt_set("validation", args.quick)
    runs = {k: runner.run(world, f"cfg_first_{k}", window(k) if k else runner.cfg(1.0), prompts, seeds=SEEDS,
                          steps=STEPS) for k in switch_steps}
    kinds = [kind for kind, _ in runs[STEPS].verdicts]
    # verdicts[image][i]: the image's oracle verdict when CFG stops after switch_steps[i] steps
    verdicts = [[runs[k].verdicts[image][1]["pass"] for k in switch_steps] for image in range(len(kinds))]

    stable = [stable_step(v) for v in verdicts]
    luckiest = [luckiest_step(v) for v in verdicts]
    by_kind = {kind: round(sum(switch_steps[i] for i, kk in zip(stable, kinds) if kk == kind) / kinds.count(kind), 2)
               for kind in sorted(set(kinds))}
    ag_steps = {}
    for threshold in AG_THRESHOLDS:
        result = runner.run(world, f"ag_{threshold}", ag(threshold), prompts, seeds=SEEDS, steps=STEPS)
        ag_steps[str(threshold)] = {"pass": round(result.pass_rate(), 4),
                                    **{kind: round(result.rows_per_image(kind) - STEPS, 2) for kind in by_kind}}
    runner.emit({
        "quick": args.quick, "steps": STEPS, "seeds": SEEDS, "cfg_scale": CFG_SCALE, "images": len(kinds),
        "cfg_pass": round(runs[STEPS].pass_rate(), 4),
        "fixed_switch_pass": {k: round(runs[k].pass_rate(), 4) for k in switch_steps},
        "stable": choice_figures(stable, verdicts, switch_steps), "stable_mean_switch_step_by_kind": by_kind,
        "ag_mean_cfg_steps_by_kind": ag_steps,
        "luckiest": choice_figures(luckiest, verdicts, switch_steps),
        "mean_switch_step_for_ag_target": round(STEPS * (1 - 2 * AG_TARGET["saving"]), 2),
    })


if __name__ == "__main__":
    main()
