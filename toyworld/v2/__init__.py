"""Toy world v2: 64x64 scenes with near-hue colours, textures, relations (spatial, support, between)
and implied shadows/reflections; an exact model-free oracle; a small latent world (VAE, contextual
text encoder, Flux-family DiT) built from ComfyUI's own classes.  See docs/toyworld.md."""
