"""Guidance Kit toy world: a procedural 32x32 scene grammar, an exact oracle judge, tiny
text-conditioned DiT models trained on it, and their training/sampling scripts.
Pure numpy/pillow/torch/safetensors; nothing here imports ComfyUI."""
