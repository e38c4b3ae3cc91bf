"""UI-format workflows (workflows/*.json, File > Save) as API prompts for ``POST /prompt``, using the
server's ``/object_info`` for each node's input order (what the frontend does on Queue)."""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}


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


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt of a UI-format workflow (muted and bypassed nodes left out)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):
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
                _, source, slot, *_ = links[entry["link"]]
                inputs[entry["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
