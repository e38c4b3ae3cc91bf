"""Safetensors storage of the toy world v2 models (never pickle).

One file per model, tensors under the key prefix ``<prefix>.``; metadata ``architecture`` (a key
of ``model.ARCHITECTURES``) and ``config`` (the builder's arguments, JSON), plus free-form
entries (the VAE's latent scale, shift and RGB factors; the classifier's labels; training steps
and seed).  Shipped files store float16 (``STORAGE_DTYPE``) and load as float32.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..weights import load_into
from . import model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FILES = {"vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors", "dit": "dit.safetensors",
         "weak": "dit_weak.safetensors", "classifier": "classifier.safetensors"}
PREFIXES = {"vae": "vae", "text_encoder": "text_encoder", "dit": "diffusion_model", "weak": "diffusion_model",
            "classifier": "classifier"}
STORAGE_DTYPE = torch.float16


def save_atomically(tensors, path, metadata):
    """``save_file`` to a temporary name next to ``path``, then rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def save_module(path, prefix, architecture, config, module, metadata=None, dtype=STORAGE_DTYPE):
    tensors = {f"{prefix}.{key}": value.detach().to("cpu", dtype).contiguous()
               for key, value in module.state_dict().items()}
    save_atomically(tensors, path, {"architecture": architecture, "config": json.dumps(config), **(metadata or {})})


def load_checked(path, prefix):
    """(module, metadata): the module the file's architecture and config build, with the float32 weights
    stored under ``prefix.``; ValueError naming the file and the keys when they do not match exactly."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        architecture = metadata.get("architecture")
        if architecture not in model.ARCHITECTURES:
            raise ValueError(f"{path}: unknown architecture {architecture!r} (expected one of "
                             f"{sorted(model.ARCHITECTURES)})")
        module = model.ARCHITECTURES[architecture](**json.loads(metadata["config"]))
        return load_into(module, handle, path, prefix, f"its {architecture}"), metadata


def load(name, directory=WEIGHTS_DIR):
    """(module, metadata) of a shipped model: "vae", "text_encoder", "dit", "weak" or "classifier"."""
    return load_checked(Path(directory) / FILES[name], PREFIXES[name])
