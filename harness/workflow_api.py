"""UI-format workflows (workflows/*.json, File > Save) as API prompts for ``POST /prompt``, using the
server's ``/object_info`` for each node's input order (what the frontend does on Queue)."""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
MUTED, BYPASSED = 2, 4
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # frontend-only nodes: the frontend never sends them


def _widget_names(definition: dict) -> list[tuple[str, bool]]:
    """(name, followed by a control_after_generate value) of a node's widget inputs, in order."""
    names = []
    for section in ("required", "optional"):
        for name in definition["input_order"].get(section, []):
            kind, *rest = definition["input"][section][name]
            options = rest[0] if rest else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                control = kind == "INT" and (options.get("control_after_generate") or name in SEED_NAMES)
                names.append((name, bool(control)))
    return names


def _source(link_id: int, wanted_type: str, links: dict, nodes: dict) -> list | None:
    """[node id, slot] that feeds ``link_id``, passing through bypassed nodes as the frontend does: a
    bypassed node hands on its input of the wanted type (the input at the link's slot first, then the
    first such input); None when it has none, or that input is not connected."""
    _, source, slot, *_ = links[link_id]
    while nodes[source].get("mode", 0) == BYPASSED:
        inputs = nodes[source].get("inputs", [])
        index = next((i for i in (slot, *range(len(inputs))) if i < len(inputs) and inputs[i]["type"] == wanted_type),
                     None)
        if index is None or inputs[index].get("link") is None:
            return None
        _, source, slot, *_ = links[inputs[index]["link"]]
    return [str(source), slot]


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt of a UI-format workflow: muted, bypassed and frontend-only (Note) nodes left out,
    links through a bypassed node passed on to its input of the same type (``_source``)."""
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (MUTED, BYPASSED) or node["type"] in VIRTUAL_NODES:
            continue
        definition = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for name, control in _widget_names(definition):
            if not values:
                break
            inputs[name] = values.pop(0)
            if control and values:
                values.pop(0)
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                source = _source(entry["link"], entry["type"], links, nodes)
                if source is not None:
                    inputs[entry["name"]] = source
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
