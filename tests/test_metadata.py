"""No drift: the minimum ComfyUI is stated once (pyproject.toml's requires-comfyui) and every other
mention agrees; the package metadata names what the pack supports; each method name and each
edit-plan field is spelled in one shipped module."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MINIMUM = PYPROJECT["tool"]["comfy"]["requires-comfyui"]
TEXTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "__init__.py",
         *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "web").rglob("*.md")),
         *sorted((ROOT / "nodes").glob("*.py")), *sorted((ROOT / "nti_core").rglob("*.py"))]
# "ComfyUI ≥ 0.3.60", "ComfyUI >= 0.3.60", "ComfyUI version 0.3.60 or later", "requires ComfyUI 0.3.60"
FLOOR = re.compile(r"ComfyUI\s*(?:≥|>=|version|v)\s*v?(\d+\.\d+\.\d+)|requires ComfyUI\s+(\d+\.\d+\.\d+)")
SHIPPED = [*sorted((ROOT / "nti_core").rglob("*.py")), *sorted((ROOT / "nodes").glob("*.py"))]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_the_minimum_comfyui_is_stated_once():
    assert re.fullmatch(r">=\d+\.\d+\.\d+", MINIMUM), MINIMUM
    floor = MINIMUM[2:]
    seen = 0
    for f in TEXTS:
        if not f.is_file():
            continue
        for m in FLOOR.finditer(f.read_text()):
            stated = m.group(1) or m.group(2)
            assert stated == floor, f"{f.relative_to(ROOT)} says ComfyUI {stated}, pyproject {floor}"
            seen += 1
    assert seen >= 1  # the README states it for users


def test_the_running_comfyui_is_new_enough():
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfyui_version.py").is_file():
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout")
    text = (Path(path) / "comfyui_version.py").read_text()
    running = re.search(r"__version__\s*=\s*\"([\d.]+)\"", text)
    assert running is not None
    assert version(running.group(1)) >= version(MINIMUM[2:])


def test_metadata_names_every_family():
    description = PYPROJECT["project"]["description"]
    for family in ("1.x", "2.x", "SDXL"):
        assert family in description, description
    assert (ROOT / PYPROJECT["project"]["readme"]).is_file()


def spelled(word: str) -> list[str]:
    """The shipped modules that spell ``word`` as a string literal or an identifier."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])")
    found = []
    for f in SHIPPED:
        code = "\n".join(line.split("#")[0] for line in f.read_text().splitlines())
        code = re.sub(r'"""[\s\S]*?"""', "", code)  # docstrings are prose
        if pattern.search(code):
            found.append(f.relative_to(ROOT).as_posix())
    return found


def test_each_method_name_is_spelled_in_one_module():
    from nti_core.methods import METHODS

    for name in METHODS:
        if name == "ddim":  # also the scheduler's and ComfyUI's sampler name
            continue
        where = [f for f in spelled(f'"{name}"') + spelled(f"'{name}'")]
        assert set(where) == {"nti_core/methods.py"}, (name, where)


def test_each_plan_field_is_spelled_in_one_module():
    """The node, the command line and the docs read the fields from nti_core/plan_spec.py (the
    engine's P2PSpec has words of its own: an edit mode is also called 'reweight')."""
    from nti_core.plan_spec import FIELDS

    readers = {"nodes/", "nti_core/app/", "nti_core/plan_spec.py"}
    for f in FIELDS:
        where = {w for w in spelled(f'"{f.name}"') + spelled(f"'{f.name}'")
                 if any(w.startswith(r) for r in readers)}
        assert where == {"nti_core/plan_spec.py"}, (f.name, where)


def test_the_readme_is_a_short_door_with_a_picture_first():
    """≤ 200 lines, a picture in the first 30, and every local link and image it names exists."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    assert any(re.search(r"!\[[^\]]*\]\([^)]+\.(jpg|png)\)", line) for line in lines[:30])
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)|src=\"([^\"]+)\"", "\n".join(lines)):
        path = next(t for t in target if t)
        if "://" not in path:
            assert (ROOT / path).exists(), path
