"""Convert a ComfyUI UI-format workflow (what the frontend saves) to API format (what /prompt runs).

UI format: ``{"nodes": [{id, type, mode, inputs: [{name, link, widget?}], widgets_values}],
"links": [[id, from_node, from_slot, to_node, to_slot, type]], "version": 0.4}``.
API format: ``{"<id>": {"class_type": type, "inputs": {name: value | ["<from_id>", from_slot]}}}``.

The frontend keeps one ``widgets_values`` entry per widget, in the node definition's input order
(required, then optional), whether or not a link drives the widget; INT inputs named ``seed`` /
``noise_seed`` or declaring ``control_after_generate`` carry one extra value (the control mode),
and trailing values of frontend-only widgets (an image upload button) are ignored. Widget-ness and
order come from ``/object_info`` (``input_order``), as the frontend does it.

Small on purpose: Note/MarkdownNote nodes are dropped, Reroute nodes are followed, muted nodes
(mode 2) are left out; bypassed nodes (mode 4), groups/subgraphs and PrimitiveNode are refused.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
DROPPED_TYPES = frozenset({"Note", "MarkdownNote"})
MODE_MUTED, MODE_BYPASS = 2, 4

ObjectInfo = dict[str, dict[str, Any]]


class WorkflowError(ValueError):
    """The UI workflow cannot be converted (unknown node, unsupported feature, bad widgets)."""


def _options(spec: list[Any]) -> dict[str, Any]:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list[Any]) -> bool:
    """True when an input spec from /object_info is shown as a widget (not a socket-only input)."""
    kind = spec[0]
    if _options(spec).get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_value_count(name: str, spec: list[Any]) -> int:
    """How many ``widgets_values`` entries the input takes (2 with a control_after_generate)."""
    control = _options(spec).get("control_after_generate") or name in ("seed", "noise_seed")
    return 2 if control else 1


def ordered_inputs(info: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """(name, spec) of a node's required then optional inputs, in definition order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def ui_to_api(workflow: dict[str, Any], object_info: ObjectInfo) -> dict[str, dict[str, Any]]:
    """The API-format prompt for a UI-format ``workflow``, given the server's ``object_info``."""
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError("expected a UI-format workflow with 'nodes' and 'links'")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported by this converter")
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(link[0]): link for link in workflow["links"]}

    def source(link_id: int) -> list[Any]:
        """[from_node_id, from_slot], following Reroute nodes upstream."""
        seen = set()
        while True:
            if link_id not in links:
                raise WorkflowError(f"link {link_id} is not in the links array")
            _, from_id, from_slot, *_ = links[link_id]
            origin = nodes.get(int(from_id))
            if origin is None:
                raise WorkflowError(f"link {link_id} comes from missing node {from_id}")
            if origin["type"] != "Reroute":
                return [str(from_id), int(from_slot)]
            if from_id in seen:
                raise WorkflowError(f"Reroute loop at node {from_id}")
            seen.add(from_id)
            link_id = origin["inputs"][0]["link"]
            if link_id is None:
                raise WorkflowError(f"Reroute node {from_id} has no input")

    prompt: dict[str, dict[str, Any]] = {}
    for node_id, node in sorted(nodes.items()):
        kind, mode = node["type"], node.get("mode", 0)
        if kind in DROPPED_TYPES or kind == "Reroute" or mode == MODE_MUTED:
            continue
        if mode == MODE_BYPASS:
            raise WorkflowError(f"node {node_id} ({kind}) is bypassed: not supported")
        if kind not in object_info:
            raise WorkflowError(f"node {node_id}: type {kind!r} is not in /object_info")
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = node.get("widgets_values") or []
        inputs: dict[str, Any] = {}
        cursor = 0
        for name, spec in ordered_inputs(object_info[kind]):
            widget = is_widget(spec)
            if widget:
                if isinstance(values, dict):  # some packs save widgets by name
                    value, found = values.get(name), name in values
                else:
                    found = cursor < len(values)
                    value = values[cursor] if found else None
                    cursor += widget_value_count(name, spec)
                if found and name not in linked:
                    inputs[name] = value
            if name in linked:
                inputs[name] = source(int(linked[name]))
            elif not widget and name in object_info[kind]["input"].get("required", {}):
                raise WorkflowError(f"node {node_id} ({kind}): required input {name!r} unlinked")
        meta = {"title": node.get("title", kind)}
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs, "_meta": meta}
    for node_id, entry in prompt.items():  # a link from a muted node cannot run
        for name, value in entry["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                raise WorkflowError(f"node {node_id} input {name!r} comes from a muted node")
    return prompt


def find_nodes(prompt: dict[str, dict[str, Any]], class_type: str) -> list[str]:
    """Ids of the API-format nodes of one type, in id order."""
    return sorted((k for k, v in prompt.items() if v["class_type"] == class_type), key=int)


def set_input(
    prompt: dict[str, dict[str, Any]], class_type: str, name: str, value: Any
) -> list[str]:
    """Set a widget input on every node of ``class_type``; returns the ids it changed."""
    ids = find_nodes(prompt, class_type)
    if not ids:
        raise KeyError(f"no {class_type} node in the prompt")
    for node_id in ids:
        if name not in prompt[node_id]["inputs"]:
            raise KeyError(f"{class_type} node {node_id} has no widget input {name!r}")
        prompt[node_id]["inputs"][name] = value
    return ids


def save_latents(prompt: dict[str, dict[str, Any]], photo_prefix: str,
                 rows_prefix: str) -> dict[str, dict[str, Any]]:
    """Also save the photo's latent (test node 902, from VAE Encode) and P2P Sample's latents
    (node 903) as files, for comparisons in latent space."""
    (encode,) = find_nodes(prompt, "VAEEncode")
    (sample,) = find_nodes(prompt, "NTIP2PSample")
    prompt["902"] = {"class_type": "SaveLatent",
                     "inputs": {"samples": [encode, 0], "filename_prefix": photo_prefix}}
    prompt["903"] = {"class_type": "SaveLatent",
                     "inputs": {"samples": [sample, 0], "filename_prefix": rows_prefix}}
    return prompt


# --------------------------------------------------------------------------- lint of UI files


WORKFLOW_KEYS = ("last_node_id", "last_link_id", "nodes", "links", "version")
NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "properties")


def _schema_problems(workflow: dict[str, Any]) -> list[str]:
    """Fields the frontend's workflow schema (zComfyWorkflow, zComfyNode in 1.27) requires."""
    problems = [f"workflow lacks {k!r}" for k in WORKFLOW_KEYS if k not in workflow]
    for node in workflow.get("nodes", []):
        where = f"node {node.get('id')} ({node.get('type')})"
        problems += [f"{where} lacks {k!r}" for k in NODE_KEYS if k not in node]
        for key in ("pos", "size"):
            value = node.get(key)
            if not (isinstance(value, list) and len(value) == 2
                    and all(isinstance(x, (int, float)) for x in value)):
                problems.append(f"{where}: {key} must be [x, y], got {value!r}")
        for slot in node.get("inputs", []) + node.get("outputs", []):
            if "name" not in slot or "type" not in slot:
                problems.append(f"{where}: slot {slot} needs a name and a type")
    for link in workflow.get("links", []):
        if not (isinstance(link, list) and len(link) == 6):
            problems.append(f"link {link!r} is not [id, from, from_slot, to, to_slot, type]")
    return problems


def ui_structure_problems(workflow: dict[str, Any]) -> list[str]:
    """Inconsistencies the frontend would trip on: missing fields, links vs node slots,
    ids vs last_*_id."""
    problems = _schema_problems(workflow)
    if problems:
        return problems
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {int(link[0]): link for link in workflow["links"]}
    if len(nodes) != len(workflow["nodes"]) or len(links) != len(workflow["links"]):
        problems.append("duplicate node or link ids")
    if nodes and workflow.get("last_node_id", -1) < max(nodes):
        problems.append("last_node_id is below the largest node id")
    if links and workflow.get("last_link_id", -1) < max(links):
        problems.append("last_link_id is below the largest link id")
    for link_id, (_, src, src_slot, dst, dst_slot, kind) in links.items():
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id} joins missing nodes {src} → {dst}")
            continue
        outs, ins = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if src_slot >= len(outs) or link_id not in (outs[src_slot].get("links") or []):
            problems.append(f"link {link_id}: node {src} output {src_slot} does not list it")
        elif outs[src_slot]["type"] != kind:
            problems.append(f"link {link_id}: type {kind} but node {src} outputs "
                            f"{outs[src_slot]['type']}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != link_id:
            problems.append(f"link {link_id}: node {dst} input {dst_slot} does not point to it")
        elif ins[dst_slot]["type"] not in (kind, "*"):
            problems.append(f"link {link_id}: type {kind} into node {dst} input "
                            f"{ins[dst_slot]['name']} of type {ins[dst_slot]['type']}")
    for node_id, node in nodes.items():
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"node {node_id} input {slot['name']}: unknown link {slot['link']}")
        for slot in node.get("outputs", []):
            for link_id in slot.get("links") or []:
                if link_id not in links:
                    problems.append(f"node {node_id} output {slot['name']}: unknown link {link_id}")
    return problems


def widget_count_problems(workflow: dict[str, Any], object_info: ObjectInfo) -> list[str]:
    """Nodes whose ``widgets_values`` length differs from what their definition implies."""
    problems = []
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None or isinstance(node.get("widgets_values"), dict):
            continue
        specs = ordered_inputs(info)
        want = sum(widget_value_count(n, s) for n, s in specs if is_widget(s))
        extra = sum(1 for _, s in specs if _options(s).get("image_upload"))  # upload button
        have = len(node.get("widgets_values") or [])
        if have not in (want, want + extra):
            problems.append(f"node {node['id']} ({node['type']}): {have} widget values, "
                            f"expected {want}")
        names = [i["name"] for i in node.get("inputs", []) if "widget" in i]
        widget_names = [n for n, s in specs if is_widget(s)]
        if [n for n in widget_names if n in names] != names:
            problems.append(f"node {node['id']} ({node['type']}): widget inputs {names}, "
                            f"definition order {widget_names}")
    return problems
