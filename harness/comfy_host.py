"""Boot the pinned ComfyUI in this process (CPU only) with the pack importable as ``guidance_kit``."""
import asyncio
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


def load_all_nodes() -> dict:
    """Register the built-in extra nodes and the pack's nodes, as the server does; returns the mapping."""
    boot()
    import nodes

    if PACK_NAME not in {getattr(c, "RELATIVE_PYTHON_MODULE", "").rsplit(".", 1)[-1]
                         for c in nodes.NODE_CLASS_MAPPINGS.values()}:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes.NODE_CLASS_MAPPINGS
