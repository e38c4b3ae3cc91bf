"""Safetensors bundles: the one way the pack writes and reads tensors (never pickle).

A bundle is a safetensors file whose metadata holds ``format`` (a versioned name such as
``guidance_kit.linear_ag/1``) and JSON-encoded values.  ``save_bundle`` writes to a temporary
name in the target folder and renames it over the target (a symlink there is replaced, not
followed; an interrupted save leaves the old file).  ``load_bundle`` reads the whole file into
memory first, so a file rewritten while it is in use never changes (or crashes) a loaded bundle,
and checks format, keys, shapes and finiteness, naming the file and the caller in every error.
"""
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

FORMAT_KEY = "format"
HEADER_LIMIT = 100 * 1024 * 1024


class BundleError(ValueError):
    """A bundle file that cannot be used (the message names the caller and the file)."""


@dataclass
class Bundle:
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)
    format: str = ""


def save_bundle(path, tensors: dict[str, torch.Tensor], metadata: dict, format: str) -> Path:
    """Write ``tensors`` (contiguous copies) and JSON-encoded ``metadata`` atomically to ``path``."""
    path = Path(path)
    encoded = {FORMAT_KEY: format, **{key: json.dumps(value) for key, value in metadata.items()}}
    data = save_safetensors_bytes({key: value.detach().contiguous().cpu() for key, value in tensors.items()},
                                  metadata=encoded)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from other users of the models folder
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _header_metadata(data: bytes, where: str, path) -> dict:
    if len(data) < 8:
        raise BundleError(f"{where}: {path} is not a safetensors file (only {len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > min(HEADER_LIMIT, len(data) - 8):
        raise BundleError(f"{where}: {path} is not a safetensors file (truncated or foreign header)")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{where}: {path} is not a safetensors file (header is not JSON: {error})") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise BundleError(f"{where}: {path} is not a safetensors file (no header object)")
    return metadata


def load_bundle(path, format: str | tuple[str, ...], where: str,
                shapes: dict[str, tuple | None] | None = None) -> Bundle:
    """Read a bundle of ``format`` (or of any format of a tuple; ``Bundle.format`` says which) fully into memory.

    ``shapes``: the exact key set expected, each with its shape (``None`` for any shape, ``-1``
    for any size of one dimension); extra or missing keys are errors.  Every floating tensor
    must be finite.  ``where`` names the caller ("LinearAG Load 'calibration'") in errors."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise BundleError(f"{where}: cannot read {path}: {error.strerror or error}") from None
    raw = _header_metadata(data, where, path)
    found = raw.get(FORMAT_KEY)
    accepted = format if isinstance(format, tuple) else (format,)
    if found not in accepted:
        raise BundleError(f"{where}: {path} is not a {' or '.join(accepted)} file (format {found!r})")
    try:
        metadata = {key: json.loads(value) for key, value in raw.items() if key != FORMAT_KEY}
    except (TypeError, json.JSONDecodeError) as error:
        raise BundleError(f"{where}: {path}: metadata is not JSON ({error})") from None
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise BundleError(f"{where}: {path} is corrupt ({error})") from None
    if shapes is not None:
        check_shapes(tensors, shapes, f"{where}: {path}")
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise BundleError(f"{where}: {path} holds non-finite values in {sorted(bad)}")
    return Bundle(tensors, metadata, found)


def check_shapes(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple | None], where: str) -> None:
    """Raise a ``BundleError`` listing missing/unexpected keys and shape mismatches."""
    problems = [f"missing {key}" for key in sorted(shapes.keys() - tensors.keys())]
    problems += [f"unexpected {key}" for key in sorted(tensors.keys() - shapes.keys())]
    for key in sorted(shapes.keys() & tensors.keys()):
        want, got = shapes[key], tuple(tensors[key].shape)
        if want is not None and (len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got))):
            problems.append(f"{key} has shape {got}, expected {tuple(want)}")
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise BundleError(f"{where}: {shown}")


def fingerprint(state_dict: dict[str, torch.Tensor], label: str = "", values_per_tensor: int = 4096) -> str:
    """A short identity of a set of weights: SHA-256 over every key, shape and an even stride of
    each tensor's values (cheap on large models, changed by any retraining or reshaping)."""
    digest = hashlib.sha256(label.encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach()
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        flat = tensor.flatten()
        if flat.numel():
            strided = flat[::max(1, flat.numel() // values_per_tensor)][:values_per_tensor]
            digest.update(strided.float().cpu().contiguous().numpy().tobytes())
    return f"{label}:{digest.hexdigest()[:16]}" if label else digest.hexdigest()[:16]
