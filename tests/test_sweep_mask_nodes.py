"""P2P Sample's MASK input and the P2P Sweep node against a real ComfyUI checkout (skipped without
$COMFYUI_PATH), on the generated tiny SD1.5 checkpoint at an 8×8 latent: outside the mask the
edits keep the reconstruction; every sweep cell is the P2P Sample run with its settings."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_nodes import PLAN_DEFAULTS, SOURCE, TARGETS, load_pack, raw_latent, run

STEPS = 4
LEFT = torch.zeros(1, 64, 64)  # the 64² image's left half (latent columns 0…3)
LEFT[..., :32] = 1.0


@pytest.fixture(scope="module")
def N(comfy_root: Any) -> Any:  # noqa: N802 (the node classes, by id)
    return {cls.GET_SCHEMA().node_id: cls for cls in load_pack().nodes.NODES}


@pytest.fixture(scope="module")
def inverted(N: Any, comfy_sd15: Any) -> dict[str, Any]:
    """DDIM Invert → Null-Text Optimize (negative-prompt: no optimisation) → the plan."""
    model, clip, _ = comfy_sd15
    traj, _ = run(N["NTIDDIMInvert"], model=model, clip=clip, latent=raw_latent(),
                  source_prompt=SOURCE, steps=STEPS, grid="reference").args
    uncond, _ = run(N["NTINullTextOptimize"], model=model, clip=clip, trajectory=traj,
                    guidance=7.5, inner_steps=2, early_stop=1e-5, method="negative-prompt").args
    return {"model": model, "trajectory": traj, "uncond": uncond, "guidance": 7.5}


def plan(N: Any, clip: Any, **change: Any) -> Any:
    return run(N["NTIAttentionEditPlan"], clip=clip, **{**PLAN_DEFAULTS, **change}).args[0]


def sample_unwired(node: type, **inputs: Any) -> torch.Tensor:
    """P2P Sample's latents in a prompt where its attention output feeds nothing: no maps are
    kept, so every unedited layer runs the fused kernel, as the sweep's cells do."""
    from comfy_api.internal import make_locked_method_func

    prompt = {"5": {"class_type": "NTIP2PSample", "inputs": {}},
              "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0]}}}
    node.GET_SCHEMA()
    clone = node.PREPARE_CLASS_CLONE({"PROMPT": prompt, "UNIQUE_ID": "5"})
    with torch.inference_mode():
        out = make_locked_method_func(node, "EXECUTE_NORMALIZED", clone)(**inputs)
    assert out.args[1] is None
    return out.args[0]["samples"]


def test_p2p_sample_keeps_the_reconstruction_outside_the_mask(N: Any, comfy_sd15: Any,
                                                               inverted: dict[str, Any]) -> None:
    clip = comfy_sd15[1]
    both = plan(N, clip)  # two targets
    free = run(N["NTIP2PSample"], plan=both, **inverted).args[0]["samples"]
    z = run(N["NTIP2PSample"], plan=both, mask=LEFT, **inverted).args[0]["samples"]
    assert z.shape == (3, 4, 8, 8)
    torch.testing.assert_close(z[0], free[0], atol=1e-5, rtol=0)  # the reconstruction
    outside, inside = (z[1:] - z[:1]).abs()[..., 4:], (z[1:] - z[:1]).abs()[..., :4]
    assert float(outside.max()) == 0.0
    assert float(inside.amax(dim=1).min()) > 0.0  # every inside cell of both edits changed
    for mask, message in ((torch.ones(2, 64, 64), "expected one mask, got a batch of 2"),
                          (torch.ones(1, 50, 64), "the mask is 64×50 .* give the mask at the "
                                                  "image's size or the latent's"),
                          (LEFT * 3, "mask values must lie in 0…1")):
        with pytest.raises(ValueError, match=message):
            run(N["NTIP2PSample"], plan=both, mask=mask, **inverted)


def test_p2p_sweep_cells_are_single_runs(N: Any, comfy_sd15: Any,
                                         inverted: dict[str, Any]) -> None:
    model, clip, vae = comfy_sd15
    grid, latents = run(N["NTIP2PSweep"], plan=plan(N, clip), vae=vae, rows="cross_end=0.2,0.8",
                        columns="self_end=0,0.5", mask=LEFT, **inverted).args
    cells = latents["samples"]
    assert cells.shape == (4, 4, 8, 8)
    assert grid.shape[0] == 1 and grid.shape[3] == 3 and min(grid.shape[1:3]) > 2 * 256
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    k = 0
    for cross in (0.2, 0.8):
        for self_end in (0.0, 0.5):
            first = plan(N, clip, target_prompts=TARGETS.splitlines()[0], cross_end=cross,
                         self_end=self_end)
            single = sample_unwired(N["NTIP2PSample"], plan=first, mask=LEFT, **inverted)
            assert torch.equal(cells[k], single[1]), (cross, self_end)
            k += 1
    assert float((cells[0] - cells[3]).abs().max()) > 0.0


@pytest.mark.parametrize("rows, columns, message", [
    ("cross_end=0.2,2", "", r"sweep cell cross_end 2: cross_end must be a fraction in \[0, 1\]"),
    ("", "", "a sweep needs an axis"),
    ("zoom=1,2", "", "'zoom' is not an edit-plan field"),
    ("reweight=cat:1,2", "self_end=0.5", "sweep cell reweight cat:1, self_end 0.5: .*'cat'"),
])
def test_p2p_sweep_refuses_bad_axes(N: Any, comfy_sd15: Any, inverted: dict[str, Any],
                                    rows: str, columns: str, message: str) -> None:
    _, clip, vae = comfy_sd15
    with pytest.raises(ValueError, match=message):
        run(N["NTIP2PSweep"], plan=plan(N, clip), vae=vae, rows=rows, columns=columns,
            **inverted)
