"""The one-way doors: the engine imports no host, no app and no node; each host imports the engine
and itself; the command line imports the engine and the diffusers host; the nodes import the
engine and the ComfyUI host; nobody imports another module's private names; each library is
imported only where its host or its one use is."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "nti_core"
SHIPPED = [*sorted(CORE.rglob("*.py")), *sorted((ROOT / "nodes").rglob("*.py")),
           ROOT / "__init__.py"]

# room → the rooms it may import (every room may import itself)
ROOMS = {
    "engine": set(),
    "hosts.comfy": {"engine"},
    "hosts.diffusers": {"engine"},
    "app": {"engine", "hosts.diffusers"},
    "nodes": {"engine", "hosts.comfy"},
    "pack": {"nodes"},
}
DIFFUSERS = "hosts/diffusers/"
# library → the files that may import it at all, and (second set) at module level
LIBRARIES = {
    "comfy": (lambda rel: rel.startswith("hosts/comfy/"), set()),
    "diffusers": (lambda rel: rel.startswith(DIFFUSERS), set()),
    "transformers": (lambda rel: rel.startswith(DIFFUSERS) or rel == "tokenizer.py", set()),
    "PIL": (lambda rel: rel in {"images.py", "app/render.py", DIFFUSERS + "demo.py"},
            {"images.py", DIFFUSERS + "demo.py"}),
    "safetensors": (lambda rel: rel == "files.py" or rel.startswith(DIFFUSERS),
                    {"files.py", DIFFUSERS + "single_file.py", DIFFUSERS + "demo.py",
                     DIFFUSERS + "models.py"}),
    "skimage": (lambda rel: rel == DIFFUSERS + "demo.py", {DIFFUSERS + "demo.py"}),
    "tqdm": (lambda rel: rel == "app/phases.py", set()),
}


def module_name(path: Path) -> str:
    """'nti_core.hosts.comfy.hooks', 'nodes.common', '' for the pack's own __init__."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def room(module: str) -> str | None:
    """The room of a module of the pack (None: a library)."""
    if module == "":
        return "pack"
    if module == "nodes" or module.startswith("nodes."):
        return "nodes"
    if module == "nti_core.__main__":
        return "app"  # python -m nti_core
    if module == "nti_core" or module.startswith("nti_core."):
        for prefix in ("hosts.comfy", "hosts.diffusers", "app"):
            name = f"nti_core.{prefix}"
            if module == name or module.startswith(name + "."):
                return prefix
        return "engine"
    return None


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(absolute module, imported names, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names], id(node) in top))
    return out


def test_the_doors_are_one_way():
    checked = 0
    for f in SHIPPED:
        here = room(module_name(f))
        for module, _, _ in imports(f):
            there = room(module)
            if there is None or there == here:
                continue
            assert there in ROOMS[here], f"{f.relative_to(ROOT)} ({here}) imports {module} ({there})"
            checked += 1
    assert checked > 50  # the pack's own imports were seen


def test_no_module_imports_private_names():
    for f in [*SHIPPED, *sorted((ROOT / "tools").rglob("*.py")),
              *sorted((ROOT / "bench").rglob("*.py"))]:
        for module, names, _ in imports(f):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{f.relative_to(ROOT)} imports {private} from {module}"


def test_libraries_are_imported_where_they_belong():
    for f in sorted(CORE.rglob("*.py")):
        rel = f.relative_to(CORE).as_posix()
        for module, _, module_level in imports(f):
            lib = module.split(".")[0]
            if lib not in LIBRARIES:
                continue
            allowed, at_top = LIBRARIES[lib]
            assert allowed(rel), f"{rel} imports {lib}"
            assert not module_level or rel in at_top, f"{rel} imports {lib} at module level"


def test_importing_every_nti_core_module_loads_no_comfy():
    env = dict(os.environ)
    comfy_path = env.get("COMFYUI_PATH")
    # with a ComfyUI checkout on the path, `comfy` is importable: the check then has teeth
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), comfy_path) if p)
    code = (
        "import importlib, pkgutil, sys, nti_core\n"
        "names = [m.name for m in pkgutil.walk_packages(nti_core.__path__, 'nti_core.')\n"
        "         if not m.name.endswith('__main__')]\n"
        "for n in names: importlib.import_module(n)\n"
        "bad = sorted(m for m in sys.modules if m == 'comfy' or m.startswith('comfy.'))\n"
        "assert not bad, bad\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) >= 20  # every module was imported


def test_the_engine_names_no_host():
    """The pipeline and the math are typed against the contract (nti_core.denoiser), not a host."""
    for f in sorted(CORE.rglob("*.py")):
        if room(module_name(f)) != "engine":
            continue
        text = f.read_text()
        for host in ("SDModel", "DiffusersDenoiser", "ComfyDenoiser", "ModelPatcher"):
            assert host not in text, f"{f.relative_to(ROOT)} names {host}"
