"""Make ComfyUI's own model classes importable for toy world v2 outside a running ComfyUI.

Inside ComfyUI (or the test harness, which boots it) ``comfy`` is already imported and nothing
changes.  A stand-alone process (training, sampling) finds the checkout named by ``COMFYUI_DIR`` or
the ``.comfyui/`` that ``make comfyui`` provisions, and boots it like ``main.py --cpu`` when no GPU
is present, with PyTorch's scaled-dot-product attention (ComfyUI's CPU default, sub-quadratic
attention, is slower at these sizes and numerically the same operation).
"""

import importlib.util
import os
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]


def ensure_comfy():
    """Import ``comfy`` (idempotent); raises RuntimeError naming the checkout when none is found."""
    if "comfy" in sys.modules:
        return
    if importlib.util.find_spec("comfy") is None:
        checkout = Path(os.environ.get("COMFYUI_DIR") or REPOSITORY / ".comfyui")
        if not (checkout / "comfy").is_dir():
            raise RuntimeError(f"toy world v2 needs ComfyUI's classes: no ComfyUI at {checkout} "
                               "(run `make comfyui` or set COMFYUI_DIR)")
        sys.path.append(str(checkout))
    import torch

    from comfy.cli_args import args

    args.cpu = args.cpu or not torch.cuda.is_available()
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (reads the arguments at import)
