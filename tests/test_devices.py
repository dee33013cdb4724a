"""No tensor made on one device meets another: read from the code (this machine has no GPU),
and run on an accelerator where one exists.

The code review is mechanical: in ``nti_core`` and ``nodes``, every ``.numpy()`` is called on a
tensor moved to the CPU in the same expression, nothing is sent to a named accelerator
(``.cuda()``, ``"cuda"`` as a device), and no random generator is made without the device of
what it draws. bench/gpu_check.py runs the whole engine on the GPU it is given.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("nti_core", "nodes") for p in (ROOT / folder).rglob("*.py"))
# The demo model's training recipe runs on the CPU by design: its seeded CPU generators are what
# make it reproducible (tools/train_demo.py); nothing else may make one.
CPU_ONLY = {"tools/train_demo.py"}
SHAPE_ONLY = ("cpu", "meta")  # devices that hold no data of an accelerator


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == name]


def moved_to_cpu(expr: ast.AST) -> bool:
    """Whether an attribute/call chain contains ``.cpu()`` or ``.to("cpu", …)``."""
    while isinstance(expr, (ast.Call, ast.Attribute, ast.Subscript)):
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
            if expr.func.attr == "cpu":
                return True
            if expr.func.attr == "to" and expr.args and isinstance(expr.args[0], ast.Constant) \
                    and expr.args[0].value == "cpu":
                return True
        expr = expr.func if isinstance(expr, ast.Call) else expr.value
    return False


def test_every_numpy_call_moves_its_tensor_to_the_cpu_first() -> None:
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        bad += [f"{path.relative_to(ROOT)}:{c.lineno}" for c in calls(tree, "numpy")
                if not moved_to_cpu(c.func.value)]
    assert bad == [], f".numpy() on a tensor that may be on an accelerator: {bad}"


def test_no_accelerator_is_named_and_no_generator_is_made_off_its_device() -> None:
    bad = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT)
        bad += [f"{where}:{c.lineno} .cuda()" for c in calls(tree, "cuda")]
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "device" and \
                    isinstance(node.value, ast.Constant) and node.value.value not in SHAPE_ONLY:
                bad.append(f"{where}:{node.value.lineno} device={node.value.value!r}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "to" and \
                    node.args and isinstance(node.args[0], ast.Constant) and \
                    node.args[0].value not in ("cpu",) and isinstance(node.args[0].value, str):
                bad.append(f"{where}:{node.lineno} .to({node.args[0].value!r})")
        bad += [f"{where}:{c.lineno} Generator without device" for c in calls(tree, "Generator")
                if not any(k.arg == "device" for k in c.keywords)
                and str(where) not in CPU_ONLY]
    assert bad == [], bad


def accelerator() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else None


@pytest.mark.skipif(accelerator() is None, reason="no GPU here: the code review above stands "
                    "in for this run (bench/gpu_check.py runs the engine on a GPU)")
def test_the_engine_runs_on_an_accelerator() -> None:
    from tiny_models import tiny_sd1

    from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize
    from nti_core.attention.plan import P2PSpec
    from nti_core.sampling import p2p_sample
    from nti_core.tokenizer import from_hf

    device = accelerator()
    m = tiny_sd1(device=device)
    z0 = m.encode_image(torch.zeros(1, 3, 64, 64, device=device))
    cond, null = m.encode_prompt("a cat sitting next to a mirror"), m.encode_prompt("")
    traj = ddim_invert(m.denoiser, z0, cond, make_grid(m.alphas_cumprod, 3), "a cat sitting "
                       "next to a mirror", record_maps=True)
    uncond = null_text_optimize(m.denoiser, traj, null, NullTextOptions(inner_steps=2,
                                                                        attention_weight=1.0))
    spec = P2PSpec(traj.prompt, ("a dog sitting next to a mirror",), blend_words=("cat", "dog"))
    ctrl = spec.build(from_hf(m.tokenizer), 3, keep_step_maps=True, latent_hw=(8, 8))
    z = p2p_sample(m.denoiser, traj, uncond,
                   torch.cat([cond, m.encode_prompt("a dog sitting next to a mirror")]),
                   controller=ctrl)
    assert z.device.type == device and torch.isfinite(z).all()
    assert m.decode(z).shape == (2, 3, 64, 64)
