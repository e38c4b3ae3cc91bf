"""The technique contract: everything a Guidance Kit technique node builds on (docs/contract.md).

Technique modules import from here (and shared types such as ``nodes.classifier``), never from each other:

* ``technique``: the ``Technique`` protocol, ``install``, ``installed``, ``run_state`` for hooks in other slots;
* ``evaluator``: ``CondEvaluator``, evaluating cond lists on all samples or a sub-batch as ComfyUI would;
* ``twins``: ``TwinSpec`` / ``guider_and_patch``, a technique's GUIDER node and MODEL-patch twin;
* ``guiders``: the standard guider inputs and ComfyUI's CFGGuider over a patched clone;
* ``checks``: input checks that name the node and the input;
* ``host``: host recipes (model identity, the sampler's cfg);
* ``model_files``: the pack's model folders, shipped artifacts (never shadowed) and the one file-name policy;
* ``training_guard``: memory estimates checked before training, interrupts, progress;
* ``stats``: the run statistics every installation reports through.
* ``toy_worlds``: what the two toy worlds' loader modules share (their Empty Latent node, CLIP model base).
"""
from . import model_files
from .checks import check_number, check_numeric_inputs, check_sampling_inputs
from .evaluator import CondEvaluator, broadcast_to_batch, rows_of_cond
from .guiders import cfg_guider, guider_inputs, model_input
from .host import encode_prompt, model_identity, sampler_cfg, stock_cfg_run
from .stats import current_run, node_id_of, record_switches, stats_sink
from .technique import Technique, install, installed, run_state
from .twins import TwinSpec, guider_and_patch

__all__ = ["CondEvaluator", "Technique", "TwinSpec", "broadcast_to_batch", "cfg_guider", "check_number",
           "check_numeric_inputs", "check_sampling_inputs", "current_run", "encode_prompt", "guider_and_patch",
           "guider_inputs", "install", "installed", "model_files", "model_identity", "model_input", "node_id_of",
           "record_switches", "rows_of_cond", "run_state", "sampler_cfg", "stats_sink", "stock_cfg_run"]
