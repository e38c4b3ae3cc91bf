"""Boot the pinned ComfyUI in this process (CPU only) with the pack importable as ``guidance_kit``."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "guidance_kit"


def comfyui_dir() -> Path:
    """The ComfyUI checkout in use: ``COMFYUI_DIR`` or the one ``make comfyui`` provisions."""
    path = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui")
    if not (path / "main.py").exists():
        raise RuntimeError(f"no ComfyUI at {path}: run `make comfyui` or set COMFYUI_DIR")
    if not (path / "custom_nodes" / PACK_NAME).exists():
        raise RuntimeError(f"{path}/custom_nodes/{PACK_NAME} missing: run `make comfyui`")
    return path


def boot() -> Path:
    """Import ComfyUI with ``--cpu`` semantics; idempotent.  Returns the ComfyUI directory."""
    path = comfyui_dir()
    for entry in (str(path / "custom_nodes"), str(path)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)

    # ComfyUI's top-level ``nodes`` now, while its folder leads sys.path: pytest later puts the repository root
    # (the pack's own ``nodes/`` package) in front when it imports the root ``__init__.py``.
    import nodes  # noqa: F401
    return path
