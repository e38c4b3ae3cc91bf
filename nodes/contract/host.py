"""Host recipes every technique shares: what identifies a model, the scale a sampler guides at."""
import hashlib


def model_identity(model) -> str:
    """Model class + SHA-256 of the first and last two weight tensors of the diffusion model (the
    identity calibrations and trained heads are checked against; weight patches are not part of it)."""
    state = model.model.diffusion_model.state_dict()
    names = sorted(state)
    digest = hashlib.sha256(type(model.model).__name__.encode())
    for name in names[:2] + names[-2:]:
        tensor = state[name].detach().float().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten()[:65536].numpy().tobytes())
    return f"{type(model.model).__name__}:{digest.hexdigest()[:16]}"


def sampler_cfg(guider) -> float:
    """The guidance scale a sampling run uses: the guider's ``cfg`` (a guider without one, e.g. BasicGuider,
    samples the conditional alone: 1)."""
    return float(getattr(guider, "cfg", 1.0))
