"""The nodes' help pages, ``web/docs/<NodeId>.md``, and the way ComfyUI's frontend finds them.

The frontend ComfyUI pins (``comfyui-frontend-package`` in ComfyUI's requirements.txt: 1.27.10
for ComfyUI 0.3.64) opens a node's help in the node library's side panel. For a node whose
``python_module`` is ``custom_nodes.<folder>`` it fetches ``/extensions/<folder>/docs/<NodeId>/
<locale>.md`` and, when that fails, ``/extensions/<folder>/docs/<NodeId>.md``; ComfyUI serves
``/extensions/<folder>/`` from the pack's ``WEB_DIRECTORY`` (``./web``). Without a page the panel
falls back to the node's description and tooltips.

The first part reads the repository only. The second (skipped without $COMFYUI_PATH) starts
ComfyUI with the pack linked in (``http_support``, no model: only static files are fetched),
requests every page at the URL the frontend builds from ``/object_info``, and checks that the
served frontend's JavaScript still builds those URLs, so a frontend upgrade that moves the help
pages fails here instead of silently showing no help.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import comfy_support
import http_support
import pytest

REPO = http_support.REPO_ROOT
NODES_DIR = REPO / "nodes"
DOCS = REPO / "web" / "docs"
PLAN_NODE = "NTIAttentionEditPlan"
PLAN_MARKERS = ("<!-- plan-fields:begin -->", "<!-- plan-fields:end -->")
MAX_LINES = 60
LOCALE = "en"  # the frontend's default locale (i18n.global.locale.value || "en")

# What the pinned frontend's bundle (assets/index-*.js) does, as found in 1.27.10; identifiers
# are matched loosely so a rebuild that only renames variables still passes:
#   extractCustomNodeName: python_module.split(".") → [0] === "custom_nodes" → [1].split("@")[0]
#   fetchCustomNodeHelp:   `/extensions/${customNodeName}/docs/${node2.name}/${locale}.md`, then
#                          `/extensions/${customNodeName}/docs/${node2.name}.md`
LOCALE_URL = re.compile(r"`/extensions/\$\{(\w+)\}/docs/\$\{(\w+)\.name\}/\$\{(\w+)\}\.md`")
FALLBACK_URL = re.compile(r"`/extensions/\$\{(\w+)\}/docs/\$\{(\w+)\.name\}\.md`")
CUSTOM_NODE_MODULE = re.compile(r'\w+\[0\]\s*===\s*"custom_nodes"')


# --------------------------------------------------------------------------- repository only


def module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` constants (``node_id=NODE`` refers to one)."""
    out = {}
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)):
            out.update({t.id: stmt.value.value for t in stmt.targets if isinstance(t, ast.Name)})
    return out


def literal(value: ast.expr, strings: dict[str, str]) -> str | None:
    if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
    if isinstance(value, ast.Name):
        return strings.get(value.id)
    return None


def schema_calls() -> dict[str, tuple[ast.Call, dict[str, str]]]:
    """node_id → (the ``io.Schema(node_id=..., ...)`` call that declares it, its module's string
    constants), from nodes/*.py."""
    found: dict[str, tuple[ast.Call, dict[str, str]]] = {}
    for path in sorted(NODES_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        strings = module_strings(tree)
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call):
                continue
            for kw in call.keywords:
                if kw.arg == "node_id":
                    node_id = literal(kw.value, strings)
                    assert node_id, f"{path.name}: node_id={ast.unparse(kw.value)} is not a " \
                        "string this test can read (a literal or a module-level constant)"
                    assert node_id not in found, f"node id {node_id} twice"
                    found[node_id] = (call, strings)
    return found


def keyword(node_id: str, name: str) -> str | None:
    call, strings = SCHEMAS[node_id]
    for kw in call.keywords:
        if kw.arg == name:
            return literal(kw.value, strings)
    return None


def socket_names(node_id: str, kind: str) -> list[str]:
    """Names of the ``X.Input("name", ...)`` / ``X.Output("name", ...)`` in the schema call
    (inputs made by helpers such as ``precision_input()`` are not seen)."""
    names = []
    for node in ast.walk(SCHEMAS[node_id][0]):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == kind and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return names


SCHEMAS = schema_calls()
NODE_IDS = sorted(SCHEMAS)


def first_heading(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return None


def test_nodes_are_found() -> None:
    assert len(NODE_IDS) >= 8, NODE_IDS
    assert PLAN_NODE in NODE_IDS
    for node_id in NODE_IDS:
        assert keyword(node_id, "display_name"), f"{node_id} has no display_name"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_node_has_a_page(node_id: str) -> None:
    page = DOCS / f"{node_id}.md"
    assert page.is_file(), f"no help page {page.relative_to(REPO)}"
    text = page.read_text(encoding="utf-8")
    assert text.strip(), f"{page.name} is empty"
    display_name = keyword(node_id, "display_name")
    assert text.lstrip().startswith("# "), f"{page.name} must start with a '# ' title"
    assert first_heading(text) == display_name, (
        f"{page.name}: first heading {first_heading(text)!r}, display_name {display_name!r}")
    for section in ("## Inputs", "## Outputs", "## Tips"):
        assert re.search(rf"^{section}\s*$", text, re.M), f"{page.name} has no '{section}'"
    assert len(text.splitlines()) <= MAX_LINES, f"{page.name}: keep it under {MAX_LINES} lines"
    assert not re.search(r"<\s*(script|iframe|style)\b", text, re.I), page.name


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_page_names_every_socket(node_id: str) -> None:
    """Each input and output the schema declares appears as **name** on the page (the plan's
    inputs are generated between the markers by another tool and are not checked here)."""
    text = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    inputs = [] if node_id == PLAN_NODE else socket_names(node_id, "Input")
    missing = [n for n in inputs + socket_names(node_id, "Output")
               if f"**{n}**" not in text]
    assert not missing, f"{node_id}.md does not describe {missing}"


def test_no_page_without_a_node() -> None:
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert not pages - set(NODE_IDS), f"pages for unknown nodes: {sorted(pages - set(NODE_IDS))}"
    assert not [p for p in DOCS.iterdir() if p.is_dir()], "locale folders would shadow the pages"


def test_plan_page_has_the_generated_section_markers() -> None:
    lines = (DOCS / f"{PLAN_NODE}.md").read_text(encoding="utf-8").splitlines()
    begin, end = PLAN_MARKERS
    assert lines.count(begin) == 1 and lines.count(end) == 1, PLAN_MARKERS
    assert lines.index(begin) < lines.index(end)
    inputs = next(i for i, line in enumerate(lines) if line.strip() == "## Inputs")
    assert inputs < lines.index(begin), "the markers belong under '## Inputs'"


def test_generated_sections_are_current() -> None:
    """The plan's fields and the methods come from nti_core/plan_spec.py and nti_core/methods.py
    (python tools/help_pages.py rewrites them); every plan field is listed."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import help_pages

    from nti_core.plan_spec import FIELDS

    assert help_pages.stale() == []
    text = (DOCS / f"{PLAN_NODE}.md").read_text(encoding="utf-8")
    for f in FIELDS:
        assert f"**{f.name}**" in text, f.name


# --------------------------------------------------------------------------- in a real ComfyUI


@pytest.fixture(scope="module")
def help_server(tmp_path_factory: pytest.TempPathFactory):
    """ComfyUI (``main.py --cpu``) with the pack linked in as custom_nodes/comfyui-nti-p2p and no
    model: the session's ``comfy_server`` would first generate its checkpoints (~1 GB)."""
    root = comfy_support.comfy_path()
    if root is None:
        pytest.skip(f"the served help pages need ${comfy_support.COMFYUI_ENV} (a ComfyUI checkout)")
    if not (root / "main.py").is_file() or not (root / "server.py").is_file():
        pytest.skip(f"${comfy_support.COMFYUI_ENV}={root} is not a ComfyUI checkout")
    base = http_support.prepare_base(tmp_path_factory.mktemp("comfy_help_base"))
    server = http_support.ComfyServer.start(root, base)
    try:
        yield server
    finally:
        server.stop()


def frontend_pin(server: http_support.ComfyServer) -> str:
    requirements = server.comfy_root / "requirements.txt"
    text = requirements.read_text() if requirements.is_file() else ""
    pin = re.search(r"^comfyui-frontend-package\S*", text, re.M)
    return pin.group(0) if pin else "comfyui-frontend-package (no pin found)"


@pytest.fixture(scope="module")
def bundle(help_server) -> str:
    return frontend_bundle(help_server)


def frontend_bundle(server: http_support.ComfyServer) -> str:
    """The JavaScript of the frontend this server serves (its web root, from the log line
    ``[Prompt Server] web root: …``), checked against the index.html it answers with."""
    found = re.search(r"\[Prompt Server\] web root: (.+)", server.log_text())
    assert found, "ComfyUI no longer logs its web root" + server.log_tail()
    web_root = Path(found.group(1).strip())
    index = server.get("/")
    assert index.status == 200
    assert index.body == (web_root / "index.html").read_bytes(), f"{web_root} is not served"
    scripts = sorted((web_root / "assets").glob("*.js"))
    assert scripts, f"no assets/*.js under {web_root}"
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in scripts)


def help_urls(python_module: str, node_id: str, bundle: str) -> tuple[str, str]:
    """(locale URL, fallback URL) as the frontend builds them, from its own template literals."""
    modules = python_module.split(".")
    assert len(modules) >= 2 and modules[0] == "custom_nodes", python_module
    folder = modules[1].split("@")[0]  # normalizePackId
    locale_match, fallback_match = LOCALE_URL.search(bundle), FALLBACK_URL.search(bundle)
    assert locale_match and fallback_match

    def fill(match: re.Match[str], locale: str | None = None) -> str:
        url = match.group(0).strip("`")
        url = url.replace("${" + match.group(1) + "}", folder)
        url = url.replace("${" + match.group(2) + ".name}", node_id)
        if locale is not None:
            url = url.replace("${" + match.group(3) + "}", locale)
        return url

    return fill(locale_match, LOCALE), fill(fallback_match)


def test_frontend_still_fetches_custom_node_help_there(help_server, bundle: str) -> None:
    pin = frontend_pin(help_server)
    assert LOCALE_URL.search(bundle), f"{pin}: the locale help URL of custom nodes changed"
    assert FALLBACK_URL.search(bundle), f"{pin}: the fallback help URL of custom nodes changed"
    assert CUSTOM_NODE_MODULE.search(bundle), f"{pin}: custom nodes are no longer told apart " \
        "by python_module 'custom_nodes.<folder>'"
    assert ".python_module" in bundle, pin


def test_server_serves_every_page_where_the_frontend_looks(help_server, bundle: str) -> None:
    info = help_server.get("/object_info", timeout=60)
    assert info.status == 200
    for node_id in NODE_IDS:
        assert node_id in info.body, f"{node_id} not loaded" + help_server.log_tail()
        node = info.body[node_id]
        assert node["python_module"] == f"custom_nodes.{http_support.PACK_NAME}", node
        assert node["display_name"] == keyword(node_id, "display_name")
        locale_url, url = help_urls(node["python_module"], node_id, bundle)
        assert url == f"/extensions/{http_support.PACK_NAME}/docs/{node_id}.md"
        # The frontend tries the locale page first: none is shipped, so it must not be found.
        assert help_server.get(locale_url).status == 404, locale_url
        served = help_server.get(url)
        assert served.status == 200, f"{url}: HTTP {served.status}"
        assert served.body == (DOCS / f"{node_id}.md").read_bytes(), url
