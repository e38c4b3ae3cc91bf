"""PPAP on the toy world: unconditional generation (empty prompt, cfg 1) steered toward each colour and each
shape class of the toy classifier, judged by the oracle (the largest object's colour or shape,
``oracle.main_object``; the guiding classifier never judges).

Configurations, all through the *PPAP Guidance* patch on ComfyUI's sampling (20 Euler steps, ``simple``):
no guidance; naive guidance (the off-the-shelf classifier on noisy inputs); one noise-aware student over
the whole range; N experts (N = 5, the shipped bundle, and a sweep N = 2, 10), every student with the same
training budget (600 steps of batch 64 on the same 1024 generated samples, ``scripts/train_ppap.py``;
missing bundles are trained into ``--work`` first).  The gradient scale of each configuration is chosen on
the dev seeds (0..) from ``SCALES``; figures are on the validation seeds (1000..), never tuned on.

Also: each student's trainable-parameter fraction and training time, and how far guidance moves the other
attribute (shape when steering colour, colour when steering shape) relative to the unguided image of the
same noise.  Last stdout line: one JSON object (accuracies with standard errors; paired differences).

    python bench/ppap.py [--quick] [--work .cache/ppap]
"""
import os

# Spinning OpenMP threads collapse throughput on shared cores (toyworld/sample.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))

import runner  # noqa: E402

SCALES = (3.0, 10.0, 30.0, 100.0)
TRAINING = {1: 600, 2: 300, 5: 120, 10: 60}  # experts -> steps per expert (600 steps each in total)
DEV_SEED, VALIDATION_SEED = 0, 1000


def targets():
    from guidance_kit.toyworld import scenes

    return [("colour", name) for name in scenes.COLOURS] + [("shape", name) for name in scenes.SHAPES]


def bundle_path(work: Path, experts: int, budget: int | None = None) -> Path:
    from guidance_kit.toyworld.weights import WEIGHTS_DIR

    if budget:
        return work / f"budget{budget}_experts{experts}.safetensors"
    shipped = WEIGHTS_DIR / "toy_ppap_experts.safetensors"
    return shipped if experts == 5 and shipped.exists() else work / f"experts{experts}.safetensors"


def ensure_bundle(world, classifier, work: Path, experts: int, budget: int | None = None) -> Path:
    """The bundle of ``experts`` experts (trained into ``work`` when missing, same pool; ``TRAINING`` steps,
    or ``budget`` steps in total)."""
    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from guidance_kit.samplers.ppap import ExpertTraining

    path = bundle_path(work, experts, budget)
    steps = budget // experts if budget else TRAINING[experts]
    if not path.exists():
        print(f"training {experts} experts into {path}", file=sys.stderr)
        adapter.train_bundle(world.model, classifier, [(world.encode(""), world.encode(""))],
                             ToyWorldEmptyLatent.execute(64)[0], path, images=1024,
                             settings=ExpertTraining(experts=experts, steps=steps),
                             work_dir=work / (f"work{budget}" if budget else "work"))
    return path


def sample(world, classifier, experts, head, name, scale, seeds, base_seed):
    """Images [seeds, 32, 32, 3] in [0, 1] for one target, noise seed ``base_seed + target index``."""
    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.nodes.contract import install
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from harness.sampling import cfg_guider, sample_guider

    model = world.model
    if experts is not None and scale > 0:
        index = classifier.class_index(head, name, "bench")
        model = install(world.model, adapter.PPAPGuidance(world.model, classifier, experts, head, index, scale))
    guider = cfg_guider(model, world.encode(""), world.encode(""), 1.0)
    seed = base_seed + targets().index((head, name))
    samples = sample_guider(guider, ToyWorldEmptyLatent.execute(seeds)[0], steps=20, sampler="euler",
                            scheduler="simple", seed=seed)
    return world.vae.decode(samples).float().cpu()


def judge(images):
    from guidance_kit.toyworld import oracle

    return [oracle.main_object(image.numpy()) for image in images]


def evaluate(world, classifier, experts, scale, seeds, base_seed, reference=None):
    """{hits: [bool per image], by_head, other_changed, distance} over every target."""
    hits, heads, other_changed, distances, verdicts = [], [], [], [], {}
    for head, name in targets():
        images = sample(world, classifier, experts, head, name, scale, seeds, base_seed)
        found = judge(images)
        verdicts[(head, name)] = (images, found)
        position = 0 if head == "colour" else 1
        hits += [attributes[position] == name for attributes in found]
        heads += [head] * len(found)
        if reference is not None:
            ref_images, ref_found = reference[(head, name)]
            other_changed += [a[1 - position] != b[1 - position] for a, b in zip(found, ref_found)]
            distances.append(float((images - ref_images).abs().mean()))
    return {"hits": hits, "heads": heads, "other_changed": other_changed, "distance": distances,
            "verdicts": verdicts}


def teacher_agreement(classifier, verdicts) -> dict:
    """How often the off-the-shelf classifier (the teacher) names the oracle's colour / shape of clean unguided
    samples: an upper bound on what distilling it can steer toward."""
    import torch

    agree = {"colour": [], "shape": []}
    for images, found in verdicts.values():
        with torch.no_grad():
            logits = classifier.logits(images.movedim(-1, 1) * 2 - 1)
        for position, head in enumerate(("colour", "shape")):
            names = classifier.heads[head]
            agree[head] += [names[int(k)] == attributes[position]
                            for k, attributes in zip(logits[head].argmax(-1), found) if attributes[position]]
    return {f"teacher_{head}_agreement": rate(values)[0] for head, values in agree.items()}


def rate(values):
    """(mean, standard error) of booleans."""
    n = len(values)
    p = sum(values) / n
    return round(p, 4), round(math.sqrt(p * (1 - p) / n), 4)


def paired(a, b):
    """Mean and standard error of the per-image difference a - b (same noise, same target)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return round(mean, 4), round(math.sqrt(var / n), 4)


def range_agreement(world, classifier, students: dict, experts: int = 5, images: int = 128) -> dict:
    """Per noise range of the N-expert split: each student's distillation KL to the teacher and top-1 agreement
    with it (colour, shape) on held-out unconditional samples (seed 50000, not in any training pool), 4 noise
    draws per sample and range; the student used for a range is the one guidance would pick there."""
    import torch

    from guidance_kit.nodes import ppap as adapter
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from guidance_kit.samplers import ppap

    model = world.model
    x0 = torch.cat([adapter._pool_chunk(model, (world.encode(""), world.encode("")), ToyWorldEmptyLatent.execute(64)[0],
                                        seed=50000 + k, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple")
                    for k in range(images // 64)])
    read, coefficients = adapter.noisy_pixels(model, classifier, "bench"), adapter.forward_coefficients(model)
    schedule = adapter.schedule_sigmas(model, "bench")
    with torch.no_grad():
        teacher = classifier.logits(read(x0, torch.zeros(len(x0))))
    generator = torch.Generator().manual_seed(7)
    out = {}
    for index, timestep_range in enumerate(ppap.timestep_ranges(len(schedule), experts)):
        sigmas = ppap.sample_training_sigmas(schedule, timestep_range, 4 * len(x0), generator)
        alpha, noise_std = coefficients(sigmas)
        noisy = ppap.forward_process(alpha, noise_std, x0.repeat(4, 1, 1, 1), torch.randn((4 * len(x0), *x0.shape[1:]),
                                                                                            generator=generator))
        pixels = read(noisy, sigmas)
        targets = {head: logits.repeat(4, 1) for head, logits in teacher.items()}
        for label, student in students.items():
            chosen = ppap.choose_experts(sigmas, student.ranges)
            with torch.no_grad():
                logits = {head: torch.empty_like(t) for head, t in targets.items()}
                for k in chosen.unique().tolist():
                    rows = chosen == k
                    for head, value in student.logits(pixels[rows], k).items():
                        if head in logits:
                            logits[head][rows] = value
                kl = float(ppap.distillation_loss({h: logits[h] for h in ("colour", "shape")},
                                                  {h: targets[h] for h in ("colour", "shape")}))
            entry = out.setdefault(label, {"kl": [], "colour_agreement": [], "shape_agreement": []})
            entry["kl"].append(round(kl, 3))
            for head in ("colour", "shape"):
                agreement = (logits[head].argmax(-1) == targets[head].argmax(-1)).float().mean()
                entry[f"{head}_agreement"].append(round(float(agreement), 3))
    return {"ranges": [list(r) for r in ppap.timestep_ranges(len(schedule), experts)], "by_student": out}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, no sweep")
    parser.add_argument("--work", default=str(runner.REPO / ".cache" / "ppap"))
    parser.add_argument("--budget", type=int, help="design check: single vs 5 experts at this many training steps in "
                                                   "total (bundles budget<N>_experts<n> in --work)")
    parser.add_argument("--ranges", action="store_true", help="only the per-noise-range agreement with the teacher "
                                                              "(naive, single, every trained expert bundle in --work)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    world = runner.load_world()
    from guidance_kit.samplers import ppap
    from guidance_kit.samplers.classifier import toy_classifier
    from guidance_kit.toyworld import weights

    classifier = toy_classifier(weights.CLASSIFIER_WEIGHTS, "bench")
    work = Path(args.work)
    if args.ranges:
        bundles = {"single" if p.stem == "experts1" else p.stem: p for p in sorted(work.glob("*experts*.safetensors"))}
        bundles["experts5"] = bundle_path(work, 5)
        students = {"naive": ppap.naive_classifier(classifier),
                    **{label: ppap.load_experts(path, classifier, "bench")[0] for label, path in bundles.items()}}
        runner.emit(range_agreement(world, classifier, students))
        return
    dev_seeds, validation_seeds = (2, 4) if args.quick else (3, 12)
    sweep = (5,) if args.quick else (2, 5, 10)

    def student(label):
        """(ExpertClassifier, bundle metadata) of a configuration, its bundle trained first when missing."""
        if label == "naive":
            return ppap.naive_classifier(classifier), None
        count = 1 if label == "single" else int(label.removeprefix("experts"))
        return ppap.load_experts(ensure_bundle(world, classifier, work, count, args.budget), classifier, "bench")
    labels = ["single", "experts5"] if args.budget else ["naive", "single", "experts5", *(f"experts{n}" for n in sweep
                                                                                           if n != 5)]

    started = time.perf_counter()
    figures = {"quick": args.quick, "budget": args.budget, "dev_images": dev_seeds * len(targets()),
               "validation_images": validation_seeds * len(targets()), "scales": list(SCALES)}
    none_dev = evaluate(world, classifier, None, 0.0, dev_seeds, DEV_SEED)
    none = evaluate(world, classifier, None, 0.0, validation_seeds, VALIDATION_SEED)
    results = {"none": none}
    figures["none_acc"], figures["none_acc_se"] = rate(none["hits"])
    for label in labels:
        experts, meta = student(label)
        dev = {scale: rate(evaluate(world, classifier, experts, scale, dev_seeds, DEV_SEED,
                                    none_dev["verdicts"])["hits"])[0] for scale in SCALES}
        scale = max(SCALES, key=lambda s: (dev[s], -s))
        result = evaluate(world, classifier, experts, scale, validation_seeds, VALIDATION_SEED, none["verdicts"])
        results[label] = result
        figures[f"{label}_dev_acc_by_scale"] = {str(s): a for s, a in dev.items()}
        figures[f"{label}_scale"] = scale
        figures[f"{label}_acc"], figures[f"{label}_acc_se"] = rate(result["hits"])
        for head in ("colour", "shape"):
            figures[f"{label}_{head}_acc"] = rate([h for h, k in zip(result["hits"], result["heads"]) if k == head])[0]
        figures[f"{label}_other_attribute_changed"] = rate(result["other_changed"])[0]
        figures[f"{label}_distance_to_unguided"] = round(sum(result["distance"]) / len(result["distance"]), 4)
        if meta is not None:
            figures[f"{label}_trainable_frac"] = round(meta["trainable_fraction"], 4)
            figures[f"{label}_train_seconds"] = round(meta["train_seconds"], 1)
    for head in ("colour", "shape"):
        figures[f"none_{head}_acc"] = rate([h for h, k in zip(none["hits"], none["heads"]) if k == head])[0]
    figures.update(teacher_agreement(classifier, none["verdicts"]))
    if args.budget:
        figures["experts5_minus_single"] = paired(results["experts5"]["hits"], results["single"]["hits"])
        runner.emit(figures)
        return
    figures["experts_acc"], figures["experts_acc_se"] = figures["experts5_acc"], figures["experts5_acc_se"]
    figures["trainable_frac"] = figures["experts5_trainable_frac"]
    figures["train_seconds"] = figures["experts5_train_seconds"]
    figures["sweep_acc"] = {str(n): figures[f"experts{n}_acc"] for n in sweep} | {"1": figures["single_acc"]}
    for better, worse in (("experts5", "naive"), ("experts5", "single"), ("single", "naive"), ("naive", "none")):
        figures[f"{better}_minus_{worse}"] = paired(results[better]["hits"], results[worse]["hits"])
    figures["bench_seconds"] = round(time.perf_counter() - started, 1)
    runner.emit(figures)


if __name__ == "__main__":
    main()
