"""Result pictures for the README and docs: each technique next to its baseline on a few dev prompts.

Every picture is a grid: one column per (prompt, seed), one row per configuration, the same noise in
every row of a column.  Everything runs through ComfyUI's real code on the toy world (the pack's
nodes through ``harness.executor.run_node``, sampling through the stock SamplerCustomAdvanced), and the
32x32 outputs are enlarged with nearest-neighbour so their pixels stay visible.  Row captions carry
the model rows (and, for DeeDiff, the transformer blocks) the run records measured.  Only dev prompts
(slice 0) are used: pictures illustrate, the figures come from the benchmarks on validation.

    python scripts/make_pictures.py            # every picture into docs/images/<name>.png
    python scripts/make_pictures.py --only gfcg
"""
import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness.comfy_host import boot  # noqa: E402
from harness.executor import run_node  # noqa: E402
from harness.sampling import sample_guider  # noqa: E402

OUT = REPO / "docs" / "images"
SCALE = 4
CELL = 32 * SCALE
GAP = 4
PITCH = CELL + GAP
LABEL_WIDTH = 250
HEADER_HEIGHT = 58
TITLE_HEIGHT = 30
BACKGROUND, INK, FAINT = (44, 44, 52), (235, 235, 235), (160, 160, 170)
STEPS = 20


@dataclass
class Sample:
    image: Image.Image
    rows: int
    baseline_rows: int
    blocks: int = 0
    full_blocks: int = 0


@dataclass
class Column:
    caption: str
    prompt: str
    seed: int


class Toy:
    """The toy world loaded once through the pack's nodes, with cached encodings and shared inputs."""

    def __init__(self):
        boot()
        import nodes

        from guidance_kit.nodes.classifier import TOY_CHOICE, LoadClassifier
        from guidance_kit.nodes.deediff import DeeDiffLoad
        from guidance_kit.nodes.linear_ag import LinearAGLoad
        from guidance_kit.nodes.toyworld import ToyWorldLoader

        self.model, self.clip, self.vae = run_node(ToyWorldLoader, "toy_dit.safetensors")
        self.weak = run_node(ToyWorldLoader, "toy_dit_weak.safetensors")[0]
        self.classifier = run_node(LoadClassifier, TOY_CHOICE, "auto")[0]
        self.heads = run_node(DeeDiffLoad, "toy_dit_heads.safetensors")[0]
        self.calibration = run_node(LinearAGLoad, "toy_dit_euler_simple_20_cfg4.safetensors")[0]
        self._text_encode = nodes.CLIPTextEncode
        self._decode = nodes.VAEDecode
        self._encoded = {}

    def encode(self, text: str):
        if text not in self._encoded:
            self._encoded[text] = run_node(self._text_encode, self.clip, text)[0]
        return self._encoded[text]

    def sample(self, guider, seed: int, sigmas=None) -> Sample:
        from guidance_kit.nodes.contract.stats import stats_sink
        from guidance_kit.nodes.toyworld import ToyWorldEmptyLatent

        latent = run_node(ToyWorldEmptyLatent, 1)[0]
        samples = sample_guider(guider, latent, steps=STEPS, scheduler="simple", seed=seed, sigmas=sigmas)
        pixels = run_node(self._decode, self.vae, {"samples": samples})[0][0]
        image = Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().cpu().numpy())
        record = stats_sink(guider.model_patcher).last
        signals = [evaluation.signals for evaluation in record.evaluations]
        return Sample(image, record.rows, record.baseline_rows, sum(s.get("blocks", 0) for s in signals),
                      sum(s.get("full_blocks", 0) for s in signals))


# Configurations: each is ``make(toy, column) -> Sample``.

def cfg(scale: float):
    def make(toy, column):
        from guidance_kit.nodes.reference_guider import ReferenceCFGGuider

        guider = run_node(ReferenceCFGGuider, toy.model, toy.encode(column.prompt), toy.encode(""), scale)[0]
        return toy.sample(guider, column.seed)
    return make


def cfg_on(prompt: str, scale: float):
    """Plain CFG on a fixed prompt, whatever the column's prompt."""
    inner = cfg(scale)
    return lambda toy, column: inner(toy, Column(column.caption, prompt, column.seed))


def adaptive_guidance(threshold: float):
    def make(toy, column):
        from guidance_kit.nodes.adaptive_guidance import AdaptiveGuidanceGuider

        guider = run_node(AdaptiveGuidanceGuider, toy.model, toy.encode(column.prompt), toy.encode(""), 4.0,
                          threshold, "auto", 0.0, 1.0)[0]
        return toy.sample(guider, column.seed)
    return make


def linear_ag(true_every: int, guided_until: float):
    def make(toy, column):
        from guidance_kit.nodes.linear_ag import LinearAGGuider

        guider = run_node(LinearAGGuider, toy.model, toy.encode(column.prompt), toy.encode(""), 4.0,
                          toy.calibration, true_every, guided_until)[0]
        return toy.sample(guider, column.seed)
    return make


def gfcg(scale: float, with_weak: bool = False):
    def make(toy, column):
        from guidance_kit.nodes.gfcg import GFCGGuider

        guider = run_node(GFCGGuider, toy.model, toy.encode(column.prompt), toy.encode(""), 2.0 if with_weak else 1.0,
                          toy.classifier, toy.clip, column.prompt, "", scale, 0.9, 0.3, 1,
                          "guide" if with_weak else "extra", toy.weak if with_weak else None)[0]
        return toy.sample(guider, column.seed)
    return make


def autoguidance(weight: float):
    def make(toy, column):
        from guidance_kit.nodes.gfcg import AutoguidanceGuider

        guider = run_node(AutoguidanceGuider, toy.model, toy.encode(column.prompt), toy.encode(""), weight,
                          toy.weak)[0]
        return toy.sample(guider, column.seed)
    return make


def composable(text: str, scale: float):
    def make(toy, column):
        from guidance_kit.nodes.composable import ComposableGuider, ComposablePrompt

        composition = run_node(ComposablePrompt, toy.clip, text, 1.0)[0]
        guider = run_node(ComposableGuider, toy.model, composition, toy.encode(""), scale, 1.0)[0]
        return toy.sample(guider, column.seed)
    return make


def ppap(target: str, scale: float):
    def make(toy, column):
        from guidance_kit.nodes.ppap import PPAPGuider

        guider = run_node(PPAPGuider, toy.model, toy.encode(""), toy.encode(""), 1.0, toy.classifier,
                          "toy_ppap_experts.safetensors", target, scale)[0]
        return toy.sample(guider, column.seed)
    return make


def deediff(threshold: float):
    def make(toy, column):
        from guidance_kit.nodes.deediff import DeeDiffModelPatch
        from guidance_kit.nodes.reference_guider import ReferenceCFGGuider

        patched = run_node(DeeDiffModelPatch, toy.model, toy.heads, threshold)[0]
        guider = run_node(ReferenceCFGGuider, patched, toy.encode(column.prompt), toy.encode(""), 4.0)[0]
        return toy.sample(guider, column.seed)
    return make


def lina_schedule(share: float, boundary: float):
    def make(toy, column):
        from guidance_kit.nodes.lina import LINASchedule
        from guidance_kit.nodes.reference_guider import ReferenceCFGGuider

        sigmas = run_node(LINASchedule, toy.model, "simple", STEPS, share, boundary, 1.0)[0]
        guider = run_node(ReferenceCFGGuider, toy.model, toy.encode(column.prompt), toy.encode(""), 4.0)[0]
        return toy.sample(guider, column.seed, sigmas=sigmas)
    return make


def dev_columns(kinds: dict[str, int], seed: int = 0) -> list[Column]:
    """The first ``kinds[kind]`` dev prompts of each kind, in the order asked, one seed."""
    from guidance_kit.toyworld import scenes

    columns = []
    for kind, count in kinds.items():
        prompts = [prompt for prompt, spec in scenes.dev_prompts() if spec["kind"] == kind][:count]
        columns += [Column(prompt, prompt, seed) for prompt in prompts]
    return columns


def seed_columns(count: int, caption: str = "") -> list[Column]:
    return [Column(f"{caption}seed {seed}", "", seed) for seed in range(count)]


PICTURES = {
    "adaptive_guidance": (
        "Adaptive Guidance and LinearAG vs CFG 4 (toy world, 20 Euler steps, same noise per column)",
        lambda: dev_columns({"single": 2, "relation": 1, "mirror": 1}),
        [("CFG 4", cfg(4.0)), ("Adaptive Guidance, threshold 0.99", adaptive_guidance(0.99)),
         ("LinearAG (shipped calibration, true every 2, until 0.5)", linear_ag(2, 0.5))]),
    "gfcg": (
        "GFCG and Autoguidance (toy world, 20 Euler steps, same noise per column)",
        lambda: dev_columns({"single": 4}),
        [("CFG 1 (conditional only)", cfg(1.0)), ("GFCG + CFG 1 (scale 2, extra row)", gfcg(2.0)),
         ("Autoguidance w 2 (weak toy DiT)", autoguidance(2.0)),
         ("GFCG + Autoguidance w 2 (guide row)", gfcg(2.0, with_weak=True))]),
    "composable": (
        "Composable AND / NOT vs one prompt, CFG 4 (toy world, same noise per column)",
        lambda: seed_columns(4),
        [("one prompt: 'a red circle and a blue square'", cfg_on("a red circle and a blue square", 4.0)),
         ("Composable: 'a red circle AND a blue square'", composable("a red circle AND a blue square", 4.0)),
         ("one prompt: 'a large circle in the center'", cfg_on("a large circle in the center", 4.0)),
         ("Composable: '... AND NOT red :2'", composable("a large circle in the center AND NOT red :2", 4.0))]),
    "ppap": (
        "PPAP: unconditional toy samples (empty prompt, cfg 1) steered by the shipped experts, scale 30",
        lambda: seed_columns(4),
        [("no guidance", cfg(1.0)), ("PPAP toward 'colour: red'", ppap("colour: red", 30.0)),
         ("PPAP toward 'colour: blue'", ppap("colour: blue", 30.0)),
         ("PPAP toward 'colour: green'", ppap("colour: green", 30.0))]),
    "deediff": (
        "DeeDiff early exit with the shipped toy heads, CFG 4 (toy world, same noise per column)",
        lambda: dev_columns({"single": 2, "relation": 1, "mirror": 1}),
        [("full model", deediff(1.0)), ("DeeDiff threshold 0.75", deediff(0.75)),
         ("DeeDiff threshold 0.70", deediff(0.70))]),
    "lina_schedule": (
        "Causality-Aware Schedule (after LINA) vs the base schedule, CFG 4, 20 steps (same noise per column)",
        lambda: dev_columns({"relation": 4}),
        [("base 'simple' schedule", cfg(4.0)), ("share 0.5 before boundary 0.2", lina_schedule(0.5, 0.2))]),
}


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType: the bitmap font, fixed size
        return ImageFont.load_default()


def row_caption(label: str, samples: list[Sample]) -> str:
    count = len(samples)
    rows = sum(s.rows for s in samples) / count
    baseline = sum(s.baseline_rows for s in samples) / count
    caption = f"{label}\n{rows:.0f} model rows / image"
    if baseline and rows < baseline:
        caption += f" (CFG {baseline:.0f})"
    full_blocks = sum(s.full_blocks for s in samples)
    if full_blocks:
        caption += f"\n{1 - sum(s.blocks for s in samples) / full_blocks:.0%} of blocks skipped"
    return caption


def draw(title: str, columns: list[Column], rows: list[tuple[str, list[Sample]]]) -> Image.Image:
    width = LABEL_WIDTH + PITCH * len(columns)
    height = TITLE_HEIGHT + HEADER_HEIGHT + PITCH * len(rows)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    pen = ImageDraw.Draw(sheet)
    pen.text((8, 8), title, fill=INK, font=font(14))
    small = font(12)
    for index, column in enumerate(columns):
        text = "\n".join(textwrap.wrap(column.caption, 19)[:4])
        pen.multiline_text((LABEL_WIDTH + index * PITCH + 4, TITLE_HEIGHT + 2), text, fill=FAINT, font=small,
                           spacing=1)
    for row, (caption, samples) in enumerate(rows):
        top = TITLE_HEIGHT + HEADER_HEIGHT + row * PITCH
        lines = [wrapped for line in caption.split("\n") for wrapped in textwrap.wrap(line, 36)]
        pen.multiline_text((8, top + 8), "\n".join(lines), fill=INK, font=small, spacing=3)
        for index, sample in enumerate(samples):
            sheet.paste(sample.image.resize((CELL, CELL), Image.NEAREST), (LABEL_WIDTH + index * PITCH, top))
    return sheet


def make(toy: Toy, name: str) -> Path:
    title, columns_of, configurations = PICTURES[name]
    columns = columns_of()
    rows = []
    for label, configuration in configurations:
        samples = [configuration(toy, column) for column in columns]
        rows.append((row_caption(label, samples), samples))
        print(f"{name}: {label}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    draw(title, columns, rows).save(path, optimize=True)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(PICTURES), action="append", help="make only these pictures")
    names = parser.parse_args(argv).only or list(PICTURES)
    toy = Toy()
    for name in names:
        path = make(toy, name)
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
