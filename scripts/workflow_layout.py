"""Layout of the shipped workflows: nodes in one column per stage (loaders, conditioning, technique,
sampling, output), a coloured group around each column, a Note above them saying what the workflow
shows, and decoded images enlarged (ImageScaleBy, nearest-exact) before Save/Preview when they are small.

Node sizes are estimates of what the ComfyUI frontend draws (title, slots, widgets; multiline text and
image nodes taller); ``tests/browser/test_layout.py`` checks the real frontend's boxes for overlaps.
"""
from harness.workflow_api import VIRTUAL_NODES, _widget_names

STAGES = ("loaders", "conditioning", "technique", "sampling", "output")
STAGE_TITLES = {"loaders": "1. Load models", "conditioning": "2. Prompts and latent", "technique": "3. Technique",
                "sampling": "4. Sampling", "output": "5. Images and run statistics"}
STAGE_COLOURS = {"loaders": "#3f5f7f", "conditioning": "#5f7f3f", "technique": "#7f3f5f", "sampling": "#7f6f3f",
                 "output": "#3f7f7f"}
NODE_WIDTH, IMAGE_NODE_SIZE, NOTE_SIZE, TITLE_CHAR_WIDTH = 360, (440, 480), (760, 230), 8
MAX_COLUMN_HEIGHT = 1100
COLUMN_GAP, ROW_GAP, GROUP_PADDING, GROUP_TITLE = 80, 40, 20, 44
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, MULTILINE_HEIGHT, RUN_STATS_EXTRA = 34, 22, 28, 120, 140
IMAGE_NODES = {"SaveImage", "PreviewImage"}
LOADERS = {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "TripleCLIPLoader", "CLIPLoader", "VAELoader",
           "CLIPVisionLoader", "ModelSamplingSD3", "ModelSamplingFlux"}
CONDITIONING = {"CLIPTextEncode", "FluxGuidance", "ConditioningZeroOut", "PrimitiveStringMultiline",
                "PrimitiveString", "EmptyLatentImage", "EmptySD3LatentImage"}
SAMPLING = {"KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "RandomNoise", "KSamplerSelect", "BasicScheduler",
            "CFGGuider", "BasicGuider"}
OUTPUT = {"VAEDecode", "ImageScaleBy", "GuidanceKitRunStats", *IMAGE_NODES}
SMALL_IMAGE = 128  # decoded images at most this wide are enlarged 8x before display


def stage(node_type: str) -> str:
    """The stage column of a node type."""
    if node_type in LOADERS or node_type.endswith(("Loader", "Load")) or node_type.startswith("GuidanceKitLoad"):
        return "loaders"
    if node_type in CONDITIONING or "Empty" in node_type or node_type.startswith("GuidanceKitComposable") and \
            node_type not in ("GuidanceKitComposableGuider", "GuidanceKitComposableModelPatch"):
        return "conditioning"
    if node_type in SAMPLING:
        return "sampling"
    if node_type in OUTPUT:
        return "output"
    return "technique"


def widget_rows(node: dict, object_info: dict) -> tuple[int, int]:
    """(single-line widgets, multiline widgets) of a node, from its definition."""
    definition = object_info.get(node["type"])
    if definition is None:
        return 0, 0
    linked = {entry["name"] for entry in node.get("inputs", []) if entry.get("link") is not None}
    specs = {**definition["input"].get("optional", {}), **definition["input"]["required"]}
    single = multi = 0
    for name, control in _widget_names(definition):
        if name in linked:
            continue
        options = specs[name][1] if len(specs[name]) > 1 else {}
        if options.get("multiline"):
            multi += 1
        else:
            single += 1 + control
    return single, multi


def node_size(node: dict, object_info: dict) -> list[int]:
    if node["type"] in IMAGE_NODES:
        return list(IMAGE_NODE_SIZE)
    if node["type"] in VIRTUAL_NODES:
        return list(NOTE_SIZE)
    single, multi = widget_rows(node, object_info)
    slots = max(len([i for i in node.get("inputs", []) if "widget" not in i]), len(node.get("outputs", [])))
    height = TITLE_HEIGHT + SLOT_HEIGHT * slots + WIDGET_HEIGHT * single + MULTILINE_HEIGHT * multi + 16
    if node["type"] == "GuidanceKitRunStats":
        height += RUN_STATS_EXTRA
    title = node.get("title") or object_info.get(node["type"], {}).get("display_name") or node["type"]
    return [max(NODE_WIDTH, TITLE_CHAR_WIDTH * len(title) + 40), height]


def _next_ids(workflow: dict) -> tuple[int, int]:
    node_id = max([n["id"] for n in workflow["nodes"]] + [workflow.get("last_node_id", 0)])
    link_id = max([link[0] for link in workflow["links"]] + [workflow.get("last_link_id", 0)])
    return node_id, link_id


def enlarge_small_images(workflow: dict, image_width: int) -> None:
    """Put an ImageScaleBy (nearest-exact, x8) between each VAEDecode and the Save/Preview node it feeds,
    when the decoded images are at most SMALL_IMAGE pixels wide (the toy world's 32x32)."""
    if image_width > SMALL_IMAGE:
        return
    nodes = {n["id"]: n for n in workflow["nodes"]}
    node_id, link_id = _next_ids(workflow)
    for link in list(workflow["links"]):
        _, source, slot, target, target_slot, kind = link
        if nodes[source]["type"] != "VAEDecode" or nodes[target]["type"] not in IMAGE_NODES:
            continue
        node_id, link_id = node_id + 1, link_id + 1
        scale = {"id": node_id, "type": "ImageScaleBy", "pos": [0, 0], "size": [NODE_WIDTH, 120], "flags": {},
                 "order": 0, "mode": nodes[target].get("mode", 0),
                 "inputs": [{"name": "image", "type": "IMAGE", "link": link[0]}],
                 "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [link_id]}],
                 "properties": {"Node name for S&R": "ImageScaleBy"}, "widgets_values": ["nearest-exact", 8.0]}
        link[3], link[4] = node_id, 0
        workflow["links"].append([link_id, node_id, 0, target, target_slot, kind])
        nodes[target]["inputs"][target_slot]["link"] = link_id
        workflow["nodes"].append(scale)
        nodes[node_id] = scale
    workflow["last_node_id"], workflow["last_link_id"] = node_id, link_id


def set_note(workflow: dict, text: str) -> None:
    """The workflow's Note (the first one, created when missing) says ``text``."""
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    if notes:
        notes[0]["widgets_values"] = [text]
        return
    node_id, _ = _next_ids(workflow)
    workflow["nodes"].append({"id": node_id + 1, "type": "Note", "pos": [0, 0], "size": list(NOTE_SIZE), "flags": {},
                              "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": "What this workflow shows",
                              "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    workflow["last_node_id"] = node_id + 1


def chain_order(nodes: list[dict], links: list) -> dict[int, tuple]:
    """A sort key per node that keeps chains together in a column: (the lowest id up the node's chain of
    same-column sources, its depth in that chain), so an ImageScaleBy sits under the VAEDecode it follows."""
    in_column = {node["id"] for node in nodes}
    source_of = {}
    for _, source, _, target, _, _ in links:
        if source in in_column and target in in_column:
            source_of.setdefault(target, source)
    keys = {}
    for node in nodes:
        chain, current = [node["id"]], node["id"]
        while current in source_of and source_of[current] not in chain:
            current = source_of[current]
            chain.append(current)
        keys[node["id"]] = (min(chain), len(chain), node["id"])
    return keys


def place_column(nodes: list[dict], left: int, top: int, max_height: int) -> tuple[int, int]:
    """Stack ``nodes`` from (left, top), starting a new sub-column when one would pass ``max_height``;
    returns the (width, height) used."""
    x, y, column_width, width, height = left, top, 0, 0, 0
    for node in nodes:
        if y > top and y + node["size"][1] - top > max_height:
            x, y = x + column_width + COLUMN_GAP // 2, top
            column_width = 0
        node["pos"] = [x + GROUP_PADDING, y]
        y += node["size"][1] + ROW_GAP + TITLE_HEIGHT
        column_width = max(column_width, node["size"][0])
        width, height = x + column_width - left, max(height, y - top)
    return width, height


def arrange(workflow: dict, object_info: dict) -> None:
    """Place every node in its stage's column (chains kept together, wrapped into sub-columns past
    MAX_COLUMN_HEIGHT; images shown in their own sub-column), the Note above, and one group per stage."""
    columns = {name: [] for name in STAGES}
    notes = []
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        node["size"] = node_size(node, object_info)
        (notes if node["type"] in VIRTUAL_NODES else columns[stage(node["type"])]).append(node)
    top = GROUP_TITLE + GROUP_PADDING
    if notes:
        x = 0
        for note in notes:
            note["pos"] = [x, 0]
            x += note["size"][0] + COLUMN_GAP
        top += max(note["size"][1] for note in notes) + ROW_GAP + GROUP_TITLE
    groups, x = [], 0
    for name, nodes in columns.items():
        if not nodes:
            continue
        keys = chain_order(nodes, workflow["links"])
        nodes.sort(key=lambda node: keys[node["id"]])
        parts = [[n for n in nodes if n["type"] not in IMAGE_NODES], [n for n in nodes if n["type"] in IMAGE_NODES]]
        width, height = 0, 0
        for part in filter(None, parts):
            used_width, used_height = place_column(part, x + width, top, MAX_COLUMN_HEIGHT)
            width, height = width + used_width + COLUMN_GAP // 2, max(height, used_height)
        width -= COLUMN_GAP // 2
        groups.append({"id": len(groups) + 1, "title": STAGE_TITLES[name], "color": STAGE_COLOURS[name],
                       "font_size": 24, "flags": {},
                       "bounding": [x, top - GROUP_TITLE - TITLE_HEIGHT, width + 2 * GROUP_PADDING,
                                    height + GROUP_TITLE + GROUP_PADDING]})
        x += width + 2 * GROUP_PADDING + COLUMN_GAP
    workflow["groups"] = groups
    for order, node in enumerate(sorted(workflow["nodes"], key=lambda n: n["id"])):
        node["order"] = order
    workflow.setdefault("extra", {})["ds"] = {"scale": 0.6, "offset": [40, 60]}
