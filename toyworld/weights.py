"""Safetensors storage of the toy-world models (never pickle).

A weight file holds one or more modules under key prefixes (``diffusion_model.``,
``text_encoder.``, ``classifier.``); its metadata ``config`` is a JSON object mapping each
prefix to that module's constructor arguments. Tensors are stored as float16 to keep the
three files small (about 10 MB together) and are cast to float32 on loading.

Files: ``toy_dit.safetensors`` (diffusion_model + text_encoder), ``toy_dit_weak.safetensors``
(diffusion_model only; uses the main text encoder), ``toy_classifier.safetensors`` (classifier).
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import scenes
from .model import ToyClassifier, ToyDiT, ToyTextEncoder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAIN_WEIGHTS = WEIGHTS_DIR / "toy_dit.safetensors"
WEAK_WEIGHTS = WEIGHTS_DIR / "toy_dit_weak.safetensors"
CLASSIFIER_WEIGHTS = WEIGHTS_DIR / "toy_classifier.safetensors"
# LinearAG calibrations of the committed main model (scripts/calibrate_linear_ag.py --toyworld).
CALIBRATIONS_DIR = Path(__file__).resolve().parent / "calibrations"
DEEDIFF_HEADS = Path(__file__).resolve().parent / "deediff" / "toy_dit_heads.safetensors"
DEEDIFF_JOINT = Path(__file__).resolve().parent / "deediff" / "toy_dit_joint.safetensors"  # heads + block adapters
STORAGE_DTYPE = torch.float16
MAX_REPORTED = 12


def save_modules(path, modules, metadata=None):
    """Save {prefix: module} to one safetensors file with per-prefix configs in the metadata."""
    tensors = {f"{prefix}.{key}": value.detach().to(STORAGE_DTYPE).contiguous()
               for prefix, module in modules.items() for key, value in module.state_dict().items()}
    configs = {prefix: module.config for prefix, module in modules.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"config": json.dumps(configs), "vocab": json.dumps(scenes.VOCAB),
                                            **(metadata or {})})


def load_checked(module_cls, path, prefix, config_key=None):
    """Build ``module_cls`` from the file's config (under ``config_key``, default ``prefix``) and
    load the float32 weights stored under ``prefix.``, requiring the stored keys and shapes to
    match the module exactly (ValueError naming the file and keys otherwise)."""
    config_key = config_key or prefix
    with safe_open(str(path), framework="pt") as handle:
        configs = json.loads((handle.metadata() or {}).get("config", "{}"))
        if config_key not in configs:
            raise ValueError(f"{path}: no config for {config_key!r} (found {sorted(configs)})")
        return load_into(module_cls(**configs[config_key]), handle, path, prefix, module_cls.__name__)


def load_into(module, handle, path, prefix: str, label: str):
    """``module`` (eval mode) with the float32 weights stored under ``prefix.`` in the open safetensors ``handle``,
    requiring keys and shapes to match exactly (ValueError naming ``path``, ``label`` and the keys otherwise)."""
    stored = {key[len(prefix) + 1:]: key for key in list(handle.keys()) if key.startswith(prefix + ".")}
    expected = module.state_dict()
    problems = [f"missing {prefix}.{key}" for key in sorted(expected.keys() - stored.keys())]
    problems += [f"unexpected {prefix}.{key}" for key in sorted(stored.keys() - expected.keys())]
    tensors = {key: handle.get_tensor(stored[key]) for key in expected.keys() & stored.keys()}
    problems += [f"shape of {prefix}.{key}: file {tuple(tensors[key].shape)} != model {tuple(expected[key].shape)}"
                 for key in sorted(tensors) if tensors[key].shape != expected[key].shape]
    if problems:
        more = len(problems) - MAX_REPORTED
        shown = "; ".join(problems[:MAX_REPORTED]) + (f"; and {more} more" if more > 0 else "")
        raise ValueError(f"{path}: weights do not match {label}: {shown}")
    module.load_state_dict({key: value.float() for key, value in tensors.items()})
    return module.eval()


def load_main(path=MAIN_WEIGHTS):
    """(ToyDiT, ToyTextEncoder) of the main model."""
    return load_checked(ToyDiT, path, "diffusion_model"), load_checked(ToyTextEncoder, path, "text_encoder")


def load_weak(path=WEAK_WEIGHTS):
    """The weak ToyDiT for Autoguidance (pair it with the main text encoder)."""
    return load_checked(ToyDiT, path, "diffusion_model")


def load_classifier(path=CLASSIFIER_WEIGHTS):
    return load_checked(ToyClassifier, path, "classifier")
