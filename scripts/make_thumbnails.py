"""Thumbnails of every shipped workflow for the README and docs: docs/images/workflows/<workflow>.png,
made from the browser tests' screenshots (run ``make test-browser`` first):

* a toy workflow: its screenshot after the run (tests/browser/test_frontend.py: out/browser/<name>.png),
  which shows the images it made;
* a real-model workflow: its layout screenshot (tests/browser/test_layout.py: out/browser/layout/<name>.png).

The frontend's side bar, tab bar and the empty canvas around the graph are cropped off, the graph scaled to
THUMBNAIL_WIDTH and reduced to a palette, so each file stays under MAX_BYTES.

    .venv/bin/python scripts/make_thumbnails.py
"""
import io
import sys
from pathlib import Path

from PIL import Image, ImageChops

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "out" / "browser"
THUMBNAILS = REPO / "docs" / "images" / "workflows"
CANVAS = (60, 40, 1920, 1080)  # (left, top, right, bottom) of the canvas in a 1920x1080 screenshot
THUMBNAIL_WIDTH = 1200
MAX_BYTES = 200_000
MARGIN = 12
# The frontend's floating bars in canvas pixels (negative: from the right/bottom edge; 0 right/bottom: the edge):
# workflow name (top left), Run toolbar and queue toast (top right), stats (bottom left), zoom (bottom right).
OVERLAYS = ((0, 0, 300, 90), (-620, 0, 0, 120), (0, -110, 200, 0), (-360, -70, 0, 0))


def content(canvas: Image.Image) -> Image.Image:
    """The canvas cropped to what differs from its background (the colour of its bottom-left corner), plus
    MARGIN, leaving out the frontend's floating bars (workflow name, Run, zoom, stats) along the top and bottom."""
    background = Image.new("RGB", canvas.size, canvas.getpixel((0, canvas.height - 1)))
    mask = ImageChops.difference(canvas, background).convert("L").point(lambda level: 255 if level > 24 else 0)
    for left, top, right, bottom in OVERLAYS:
        mask.paste(0, (left % canvas.width, top % canvas.height, right or canvas.width, bottom or canvas.height))
    box = mask.getbbox()
    if box is None:
        return canvas
    left, top, right, bottom = box
    return canvas.crop((max(0, left - MARGIN), max(0, top - MARGIN), min(canvas.width, right + MARGIN),
                        min(canvas.height, bottom + MARGIN)))


def thumbnail(screenshot: Path) -> bytes:
    """The PNG bytes of a screenshot's canvas, scaled down and palettised until it fits MAX_BYTES."""
    with Image.open(screenshot) as image:
        canvas = content(image.convert("RGB").crop(CANVAS))
    width = min(THUMBNAIL_WIDTH, canvas.width)
    while True:
        scaled = canvas.resize((width, round(canvas.height * width / canvas.width)), Image.LANCZOS)
        buffer = io.BytesIO()
        scaled.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
        if buffer.tell() < MAX_BYTES:
            return buffer.getvalue()
        width = int(width * 0.85)


def main() -> None:
    workflows = sorted((REPO / "workflows").glob("*.json"))
    THUMBNAILS.mkdir(parents=True, exist_ok=True)
    missing = []
    for workflow in workflows:
        after_run, layout = SCREENSHOTS / f"{workflow.stem}.png", SCREENSHOTS / "layout" / f"{workflow.stem}.png"
        source = after_run if workflow.stem.startswith("toy_") else layout  # a toy's layout shot shows no images
        if not source.exists():
            missing.append(workflow.stem)
            continue
        target = THUMBNAILS / f"{workflow.stem}.png"
        tmp = target.with_suffix(".png.tmp")
        tmp.write_bytes(thumbnail(source))
        tmp.replace(target)
        print(f"{target.relative_to(REPO)} ({target.stat().st_size // 1000} KB) from {source.relative_to(REPO)}")
    if missing:
        sys.exit(f"no screenshot of {missing}: run `make test-browser` first")


if __name__ == "__main__":
    main()
