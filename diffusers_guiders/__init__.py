"""Guidance Kit's techniques as guiders for Modular Diffusers (``diffusers.guiders.BaseGuidance``).

Import as ``guidance_kit.diffusers_guiders`` (the pack's folder is the ``guidance_kit`` package; put the
folder that holds it on ``sys.path``).  Each guider is a thin adapter over the same ``samplers/``
functions as the ComfyUI nodes; swap one into a Modular pipeline with
``pipe.update_components(guider=...)``.  Needs diffusers (``pip install ".[diffusers]"``); the guider API
is experimental upstream, so the tested range is pinned (``TESTED_DIFFUSERS``) and another version only
warns.  Why the folder is not called ``diffusers``: docs/diffusers.md.
"""
import logging

import diffusers
from packaging.version import Version

from .adaptive_guidance import AdaptiveGuidance
from .autoguidance import Autoguidance
from .composable import ComposableGuidance
from .gfcg import GFCG
from .latents import StepSample, show_latents
from .linear_ag import LinearAG, calibrate_linear_ag
from .ppap import PPAP

TESTED_DIFFUSERS = (Version("0.42.0"), Version("0.43.0"))  # [low, high): pyproject.toml's `diffusers` extra

if not TESTED_DIFFUSERS[0] <= Version(diffusers.__version__) < TESTED_DIFFUSERS[1]:
    logging.getLogger(__name__).warning(
        "Guidance Kit's diffusers guiders are tested with diffusers >=%s,<%s; found %s (the guider API is "
        "experimental and may have changed)", *TESTED_DIFFUSERS, diffusers.__version__)

__all__ = ["AdaptiveGuidance", "Autoguidance", "ComposableGuidance", "GFCG", "LinearAG", "PPAP", "calibrate_linear_ag",
           "StepSample", "show_latents", "TESTED_DIFFUSERS"]
