"""The one-way doors: nti_core imports no ComfyUI module, and only its hosts import their host."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "nti_core"
DIFFUSERS_HOST = {"hosts/diffusers.py", "hosts/diffusers_models.py", "hosts/sd1_single_file.py",
                  "hosts/diffusers_demo.py", "hosts/diffusers_demo_train.py"}
COMFY_HOST = {f"hosts/comfy/{f.name}" for f in (CORE / "hosts" / "comfy").glob("*.py")}
HOST_ONLY = {"comfy": COMFY_HOST, "diffusers": DIFFUSERS_HOST}
LAZY_OK = {"transformers": {"tokenizer.py"} | DIFFUSERS_HOST,
           "PIL": {"images.py", "hosts/diffusers_demo.py"},
           "safetensors": {"files.py"} | DIFFUSERS_HOST, "skimage": {"hosts/diffusers_demo.py"},
           "tqdm": {"cli.py"}}


def imported_roots(path: Path) -> list[tuple[str, bool]]:
    """(top-level package, imported at module level?) for every import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], id(node) in top))
    return out


def test_only_the_hosts_import_their_host():
    for f in sorted(CORE.rglob("*.py")):
        rel = f.relative_to(CORE).as_posix()
        for root, module_level in imported_roots(f):
            if root in HOST_ONLY:
                assert rel in HOST_ONLY[root], f"{rel} imports {root}"
                if root == "comfy":
                    assert not module_level, f"{rel} imports comfy at module level"
            if root in LAZY_OK and module_level:
                assert rel in LAZY_OK[root], f"{rel} imports {root} at module level"


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
