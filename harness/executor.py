"""Run a node the way ComfyUI's executor (``execution.py``) runs it, for the in-process test tiers.

The executor runs every prompt under ``torch.inference_mode()``; it gives a V3 node a class clone
carrying its hidden inputs (``PREPARE_CLASS_CLONE``), sets the current node context (progress bars
and ``get_executing_context``) and checks for an interrupt before the node starts.  ``run_node``
does all of that, so a node that only works outside this context fails here as it would in the
server.  Call nodes through it, never through ``execute`` directly (``tests/test_pack.py`` checks).
"""
import itertools
import uuid

import torch

from .comfy_host import boot

_node_ids = itertools.count(1)


def run_node(node, *args, unique_id: str | None = None, **inputs):
    """``node``'s outputs (a V3 ``NodeOutput`` or a V1 tuple) for ``inputs``, executed as the server would.

    ``node`` is a V3 ``io.ComfyNode`` class or a V1 node class; positional ``args`` follow the
    schema's input order (V3) or the node's function signature (V1)."""
    boot()
    from comfy_execution.utils import CurrentNodeContext

    import nodes
    from comfy_api.latest import io

    unique_id = unique_id or str(next(_node_ids))
    with torch.inference_mode(), CurrentNodeContext(uuid.uuid4().hex, unique_id, 0):
        nodes.before_node_execution()
        if isinstance(node, type) and issubclass(node, io.ComfyNode):
            node.VALIDATE_CLASS()
            clone = node.PREPARE_CLASS_CLONE({"unique_id": unique_id})
            return clone.EXECUTE_NORMALIZED(*args, **inputs)
        instance = node() if isinstance(node, type) else node
        return getattr(instance, instance.FUNCTION)(*args, **inputs)


def in_executor(function, *args, **kwargs):
    """``function(*args, **kwargs)`` under the executor's grad mode (for code a node would run)."""
    with torch.inference_mode():
        return function(*args, **kwargs)
