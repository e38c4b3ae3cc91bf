"""Shared benchmark runner: a sampler configuration x prompt set x seeds on the toy world.

Everything goes through ComfyUI's real code: the toy MODEL/CLIP/VAE from ``nodes/toyworld.py``,
prompts encoded by the stock CLIPTextEncode, sampling by the stock SamplerCustomAdvanced, images
decoded by the pixel-space VAE, scored by the toy world's oracle (which never sees a model).

A configuration is a ``make_guider(model, positive, negative) -> GUIDER`` callable; a MODEL-patch
technique is benchmarked as ``cfg_guider(patched_model, ...)``.  Each prompt is sampled once with a
batch of ``seeds`` images (noise from seed ``base_seed + prompt index``), so every configuration
sees exactly the same noise.
"""
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from harness.comfy_host import boot  # noqa: E402
from harness.sampling import cfg_guider, sample_guider  # noqa: E402

FACTS = ("colour", "shape", "position", "relation", "implied")


@dataclass
class ToyWorld:
    """The toy model, its CLIP and VAE, loaded once, with cached prompt encodings."""

    model: object
    clip: object
    vae: object
    weak_model: object = None
    _encoded: dict = field(default_factory=dict)

    def encode(self, prompt: str):
        if prompt not in self._encoded:
            import nodes

            self._encoded[prompt] = nodes.CLIPTextEncode().encode(self.clip, prompt)[0]
        return self._encoded[prompt]


def load_world(with_weak: bool = False) -> ToyWorld:
    boot()
    from guidance_kit.nodes import toyworld as adapter
    from guidance_kit.toyworld import weights

    return ToyWorld(adapter.load_model(weights.MAIN_WEIGHTS), adapter.load_clip(weights.MAIN_WEIGHTS),
                    adapter.pixel_space_vae(), adapter.load_model(weights.WEAK_WEIGHTS) if with_weak else None)


def prompt_set(name: str, quick: bool) -> list[tuple[str, dict]]:
    """``dev`` (tuning, tests) or ``validation`` (reported, never tuned on); quick = every other prompt."""
    from guidance_kit.toyworld import scenes

    prompts = {"dev": scenes.dev_prompts, "validation": scenes.validation_prompts}[name]()
    return prompts[::2] if quick else prompts


@dataclass
class Result:
    name: str
    images: list = field(default_factory=list)      # per prompt: float tensor [seeds, 32, 32, 3] in [0, 1]
    verdicts: list = field(default_factory=list)    # per image: (kind, oracle dict)
    rows: int = 0
    rows_by_kind: dict = field(default_factory=dict)  # prompt kind -> model rows of its images
    baseline_rows: int = 0
    blocks: int = 0
    seconds: float = 0.0
    evaluations: int = 0

    def pass_rate(self, kind: str | None = None, fact: str = "pass") -> float | None:
        values = [v[fact] for k, v in self.verdicts if (kind is None or k == kind) and fact in v]
        return sum(values) / len(values) if values else None

    def rows_per_image(self, kind: str) -> float:
        """Mean model rows per image of the prompts of ``kind``."""
        return self.rows_by_kind[kind] / sum(k == kind for k, _ in self.verdicts)

    def distance_to(self, reference: "Result") -> float:
        """Mean absolute pixel difference (0..1 scale) to the same prompts and seeds of ``reference``."""
        import torch

        return float(torch.stack([(a - b).abs().mean() for a, b in zip(self.images, reference.images)]).mean())

    def figures(self, reference: "Result | None" = None) -> dict:
        out = {"pass": self.pass_rate(), "rows": self.rows, "baseline_rows": self.baseline_rows,
               "blocks": self.blocks, "seconds": round(self.seconds, 3), "evaluations": self.evaluations}
        for kind in ("single", "relation", "mirror"):
            out[f"{kind}_pass"] = self.pass_rate(kind)
        for fact in FACTS:
            out[f"{fact}_correct"] = self.pass_rate(fact=fact)
        if reference is not None:
            out["distance_to_reference"] = round(self.distance_to(reference), 5)
        return out


class _BlockCounter:
    """Counts batch rows through each transformer block (forward hooks, removed afterwards)."""

    def __init__(self, network):
        self.count = 0
        self.handles = [block.register_forward_hook(self._hook) for block in network.blocks]

    def _hook(self, module, inputs, output):
        self.count += int(inputs[0].shape[0])

    def close(self):
        for handle in self.handles:
            handle.remove()


def run(world: ToyWorld, name: str, make_guider, prompts: list[tuple[str, dict]], *, seeds: int = 4,
        steps: int = 20, sampler: str = "euler", scheduler: str = "simple", base_seed: int = 0,
        negative: str = "", progress: bool = True, sigmas=None) -> Result:
    """Sample every prompt of ``prompts`` with ``seeds`` images through ``make_guider`` (on ``sigmas`` when
    given, else ``steps`` of ``scheduler``); judge with the oracle."""

    from guidance_kit.nodes.contract.stats import attach_run_stats, stats_sink
    from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent
    from guidance_kit.toyworld import oracle

    result = Result(name)
    model = world.model.clone()
    attach_run_stats(model, name)
    counter = _BlockCounter(world.model.model.diffusion_model)
    try:
        for index, (prompt, spec) in enumerate(prompts):
            guider = make_guider(model, world.encode(prompt), world.encode(negative))
            latent = ToyWorldEmptyLatent.execute(seeds)[0]
            start = time.perf_counter()
            samples = sample_guider(guider, latent, steps=steps, sampler=sampler, scheduler=scheduler,
                                    seed=base_seed + index, sigmas=sigmas)
            result.seconds += time.perf_counter() - start
            run_stats = stats_sink(guider.model_patcher).last
            result.rows += run_stats.rows
            result.rows_by_kind[spec["kind"]] = result.rows_by_kind.get(spec["kind"], 0) + run_stats.rows
            result.baseline_rows += run_stats.baseline_rows
            result.evaluations += len(run_stats.evaluations)
            images = world.vae.decode(samples).float().cpu()
            result.images.append(images)
            result.verdicts += [(spec["kind"], oracle.judge(image.numpy(), spec)) for image in images]
            if progress:
                print(f"\r{name}: {index + 1}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
    finally:
        counter.close()
    if progress:
        print(file=sys.stderr)
    result.blocks = counter.count
    return result


def cfg(scale: float):
    """Plain CFG (ComfyUI's CFGGuider) at ``scale``: the baseline configuration."""
    return lambda model, positive, negative: cfg_guider(model, positive, negative, scale)


def emit(figures: dict) -> None:
    """Print the benchmark's final JSON line."""
    print(json.dumps(figures, sort_keys=True))
