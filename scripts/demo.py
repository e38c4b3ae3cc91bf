"""`make demo`: sample with the Reference CFG Guider through ComfyUI's real sampler and save a PNG.

Runs on a tiny random-weight SD1.5-style model (20 Euler steps, cfg 6) until the toy-world model
lands; prints where the image and the run's row count are.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness import tiny_models  # noqa: E402
from harness.sampling import sample_guider  # noqa: E402


def latent_to_png(samples, path: Path) -> None:
    import numpy as np
    from PIL import Image

    rgb = samples[0, :3].permute(1, 2, 0).numpy()
    rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-8)
    Image.fromarray((rgb * 255).astype(np.uint8)).resize((256, 256), Image.NEAREST).save(path)


def main() -> None:
    tiny = tiny_models.build("sd15_eps")
    from guidance_kit.nodes.reference_guider import ReferenceCFGGuider
    from guidance_kit.nodes.run_stats import stats_sink

    guider = ReferenceCFGGuider.execute(tiny.patcher, tiny.positive, tiny.negative, 6.0)[0]
    samples = sample_guider(guider, tiny.empty_latent(), steps=20, seed=1)
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    path = out / "demo_reference_cfg.png"
    latent_to_png(samples, path)
    print(stats_sink(guider.model_patcher).last.summary())
    print(f"demo image written to {path}")


if __name__ == "__main__":
    main()
