"""Guidance Kit's math: plain torch over tensors and callables, importing nothing from ComfyUI.

Everything here works on model predictions and noise levels, so it can be tested alone and used
from diffusers or any other sampler; ``nodes/`` adapts it to ComfyUI's objects.
"""
