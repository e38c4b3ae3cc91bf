"""`make demo`: run every workflow in workflows/ on the real ComfyUI server, collect the images.

Starts ``main.py --cpu`` with the pack installed, sends each workflow file through comfy-cli
(``comfy run --workflow ... --wait``, UI-format files are converted with the server's
/object_info), copies the saved images to ``out/demo/`` and draws a contact sheet
(``out/demo/contact_sheet.png``: one row per workflow, images enlarged 4x).
"""
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from harness.server import ComfyServer  # noqa: E402

OUT = REPO / "out" / "demo"
SCALE = 4
LABEL_WIDTH = 220


def saved_images(server: ComfyServer, entry: dict) -> list[Path]:
    return [server.output_dir / image["subfolder"] / image["filename"]
            for output in entry["outputs"].values() for image in output.get("images", [])
            if image.get("type") == "output"]


def run_workflow(server: ComfyServer, workflow: Path) -> list[Path]:
    before = set(server.get("/history"))
    result = server.comfy_cli_run(workflow)
    if result.returncode != 0:
        raise SystemExit(f"{workflow.name} failed:\n{result.stdout}\n{result.stderr}")
    entries = [entry for key, entry in server.get("/history").items() if key not in before]
    copies = []
    for index, source in enumerate(path for entry in entries for path in saved_images(server, entry)):
        target = OUT / f"{workflow.stem}_{index:02d}.png"
        shutil.copyfile(source, target)
        copies.append(target)
    return copies


def contact_sheet(rows: dict[str, list[Path]], path: Path) -> None:
    cell = 32 * SCALE
    width = LABEL_WIDTH + cell * max(len(images) for images in rows.values())
    sheet = Image.new("RGB", (width, cell * len(rows)), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    for row, (name, images) in enumerate(rows.items()):
        draw.text((8, row * cell + cell // 2 - 6), name, fill=(230, 230, 230))
        for column, image_path in enumerate(images):
            image = Image.open(image_path).convert("RGB")
            image = image.resize((cell, cell * image.height // image.width), Image.NEAREST)
            sheet.paste(image, (LABEL_WIDTH + column * cell, row * cell))
    sheet.save(path)


def main() -> None:
    workflows = sorted((REPO / "workflows").glob("*.json"))
    if not workflows:
        raise SystemExit("no workflows in workflows/")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {}
    with ComfyServer() as server:
        for workflow in workflows:
            print(f"running {workflow.name} ...", flush=True)
            # The sheet shows generated 32x32 images; larger outputs (stats plots) stay in out/demo/ only.
            rows[workflow.stem] = [p for p in run_workflow(server, workflow) if Image.open(p).width <= 64]
    rows = {name: images for name, images in rows.items() if images}
    sheet = OUT / "contact_sheet.png"
    contact_sheet(rows, sheet)
    print(f"demo images written to {OUT}/ ({sum(map(len, rows.values()))} images from {len(workflows)} workflows)")
    print(f"contact sheet: {sheet}")


if __name__ == "__main__":
    main()
