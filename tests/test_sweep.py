"""The settings sweep: every cell is the single P2P run with its settings, from one inversion with
no optimisation; its labels carry the values; bad axes are refused before anything samples —
the engine on the tiny model, the grid image, and the command line's ``--sweep``."""

from __future__ import annotations

import pytest
import torch
from core_support import CAT, CAT_PROMPT, cat_latent, tiny_model

import nti_core.sweep as sweep_module
from nti_core import ddim_invert, make_grid, negative_prompt_inversion, p2p_sample
from nti_core.images import labelled_grid
from nti_core.plan_spec import fields_of, plan_from_fields
from nti_core.sweep import plan_sweep, sample_sweep
from nti_core.tokenizer import from_hf

STEPS = 4
TIGER = "a tiger sitting next to a mirror"
FIELDS = {"source_prompt": CAT_PROMPT, "target_prompts": f"{TIGER}\na dog sitting next to a mirror",
          "reweight": "mirror:2", "blend_words": "cat tiger", "blend_threshold": 0.95}


@pytest.fixture(scope="module")
def setup():
    m = tiny_model()
    traj = ddim_invert(m.denoiser, cat_latent(128), m.encode_prompt(CAT_PROMPT),
                       make_grid(m.alphas_cumprod, STEPS), CAT_PROMPT)
    ctx = torch.cat([traj.embedding, m.encode_prompt(TIGER)])
    return m, traj, negative_prompt_inversion(traj), from_hf(m.tokenizer), ctx


class Counting:
    """The denoiser, counting its calls and checking none of them builds a graph."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)

    def eps(self, z, *args, **kwargs):
        assert not torch.is_grad_enabled() and z.shape[0] == 4  # [∅ | c] × [source, target]
        self.calls += 1
        return self.denoiser.eps(z, *args, **kwargs)


def test_cells_equal_single_runs_without_optimising(setup, monkeypatch) -> None:
    m, traj, uncond, tok, ctx = setup
    cells = plan_sweep(FIELDS, ["cross_end=0.2,0.8", "reweight=tiger:1,4"], tok, STEPS)
    assert cells.shape == (2, 2)
    samplings = []

    def spy(*args, **kwargs):
        samplings.append(kwargs["controller"])
        return p2p_sample(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "p2p_sample", spy)
    den = Counting(m.denoiser)
    z = sample_sweep(den, traj, uncond, ctx, cells, tok, mask=torch.ones(16, 16))
    assert z.shape == (4, 4, 16, 16)
    assert len(samplings) == 4 and den.calls == 4 * STEPS  # one P2P sampling per cell
    k = 0
    for cross in (0.2, 0.8):
        for weight in (1, 4):
            spec = plan_from_fields({**FIELDS, "target_prompts": TIGER, "cross_end": cross,
                                     "reweight": f"mirror:2.0, tiger:{weight:.1f}"})
            assert cells.plans[k] == spec
            single = p2p_sample(m.denoiser, traj, uncond, ctx, controller=spec.build(
                tok, STEPS, latent_hw=(16, 16), mask=torch.ones(16, 16)))
            assert torch.equal(z[k], single[1]), (cross, weight)
            k += 1
    spread = [float((z[i] - z[0]).abs().max()) for i in range(1, 4)]
    assert min(spread) > 1e-4  # each setting changed the edit


def test_labels_carry_the_values(tok) -> None:
    cells = plan_sweep(FIELDS, ["self_end=0,0.25", "blend_threshold=0.5,0.75,0.9"], tok)
    assert cells.labels() == (["self_end 0", "self_end 0.25"],
                              ["blend_threshold 0.5", "blend_threshold 0.75",
                               "blend_threshold 0.9"])
    assert [(p.self_steps[1], p.blend_threshold) for p in cells.plans] == [
        (0.0, 0.5), (0.0, 0.75), (0.0, 0.9), (0.25, 0.5), (0.25, 0.75), (0.25, 0.9)]
    assert TIGER in cells.title and "first target" in cells.title
    one = plan_sweep(FIELDS, ["self_limit=16x16,32x32"])  # one axis: the columns of one row
    assert one.shape == (1, 2) and one.labels() == ([""], ["self_limit 16x16",
                                                          "self_limit 32x32"])
    assert [p.self_limit for p in one.plans] == [16, 32]
    assert plan_sweep(FIELDS, ["uncond_self_end=0.3", ""]).shape == (1, 1)  # rows only


@pytest.mark.parametrize("axes, message", [
    (["zoom=1,2"], "sweep 'zoom=1,2': 'zoom' is not an edit-plan field; sweep one of"),
    (["source_prompt=a,b"], "'source_prompt' cannot be swept"),
    (["cross_end=0.2,1.5"], r"sweep cell cross_end 1.5: cross_end must be a fraction in \[0, 1\], "
                            "got 1.5"),
    (["cross_start=0.5", "cross_end=0.8,0.2"],
     r"sweep cell cross_start 0.5, cross_end 0.2: cross_start \(0.5\) is after cross_end \(0.2\)"),
    (["cross_end=0.2", "self_end=0.5", "blend_threshold=0.3"], "at most two axes"),
    (["", ""], "a sweep needs an axis"),
    ([], "a sweep needs an axis"),
    (["cross_end="], "no values after '='"),
    (["cross_end"], "a sweep axis is 'field=v1,v2,…'"),
    (["cross_end=0.2,lots"], "'lots' is not a number"),
    (["reweight=2,4"], "one word and its values, 'word:v1,v2,…', got '2,4'"),
    (["reweight=zebra:1,2"], "sweep cell reweight zebra:1: .*zebra"),
    (["self_limit=8x8"], r"sweep cell self_limit 8x8: self_limit must be one of \['32x32', "
                         r"'16x16'\], got '8x8'"),
    (["self_end=0.2,0.5", "self_end=0.8"], "both sweep self_end"),
])
def test_bad_axes_are_refused_with_the_fields_message(tok, axes, message) -> None:
    with pytest.raises(ValueError, match=message):
        plan_sweep(FIELDS, axes, tok)


def test_a_bad_mask_is_refused_before_the_first_cell(setup) -> None:
    m, traj, uncond, tok, ctx = setup
    den = Counting(m.denoiser)
    cells = plan_sweep(FIELDS, ["cross_end=0.2,0.8"], tok, STEPS)
    with pytest.raises(ValueError, match="expected one mask, got a batch of 2"):
        sample_sweep(den, traj, uncond, ctx, cells, tok, mask=torch.ones(2, 16, 16))
    with pytest.raises(ValueError, match="expected 2 prompt embeddings, got 1"):
        sample_sweep(den, traj, uncond, ctx[:1], cells, tok)
    assert den.calls == 0


def test_fields_of_inverts_plan_from_fields() -> None:
    for change in ({}, {"cross_words": "tiger:0.3, mirror:0.6", "cross_start": 0.1},
                   {"reweight": "tiger:2, mirror:0.5", "edit_kind": "refine",
                    "self_limit": "16x16", "uncond_self_end": 0.4, "self_start": 0.2},
                   {"blend_words": "cat, tiger", "subtract_words": "mirror",
                    "blend_start": 0.3}):
        spec = plan_from_fields({**FIELDS, **change})
        assert plan_from_fields(fields_of(spec)) == spec, change
    from nti_core.attention.plan import P2PSpec

    with pytest.raises(ValueError, match="cannot be written as edit-plan fields"):
        fields_of(P2PSpec(CAT_PROMPT, (TIGER,), cross={"default_": (0.1, 0.8),
                                                         "tiger": (0.0, 0.5)}))


def test_grid_lays_out_tiles_under_their_labels() -> None:
    tiles = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0, 0.25)])
    grid = labelled_grid(tiles, ["a", "b"], ["x", "y", "z"], "title", tile=64)
    bare = labelled_grid(tiles[:3], [""], ["", "", ""], tile=64)
    assert grid.dtype.name == "uint8" and grid.shape[2] == 3
    assert grid.shape[1] > bare.shape[1] and grid.shape[0] > bare.shape[0] + 64  # labels' room
    assert bare.shape == (8 + 8 + 64 + 8, 8 + 3 * (64 + 8), 3)  # no labels: only the padding
    assert (bare[16:80, 8:72] == 0).all() and (bare[16:80, 80:144] == 64).all()
    with pytest.raises(ValueError, match="6 images for 1 rows × 3 columns"):
        labelled_grid(tiles, [""], ["x", "y", "z"])


# ------------------------------------------------------------------------------ command line


def test_cli_sweep(tiny_ckpt, tmp_path, monkeypatch, capsys) -> None:
    """--sweep twice: sweep.png (rows × columns) and its report entry; the cell with the run's
    own settings is the run's edit; the photo is inverted and optimised once."""
    import json

    from PIL import Image

    import nti_core.app.edit as cli
    import nti_core.null_text as null_text
    from nti_core.app import main

    seen: dict[str, list] = {"edit": [], "sweep": [], "optimise": []}

    def spy(name, real):
        def call(*args, **kwargs):
            seen[name].append(real(*args, **kwargs))
            return seen[name][-1]
        return call

    monkeypatch.setattr(cli, "edit", spy("edit", cli.edit))
    monkeypatch.setattr(cli, "sweep", spy("sweep", cli.sweep))
    monkeypatch.setattr(null_text, "null_text_optimize",
                        spy("optimise", null_text.null_text_optimize))
    out = tmp_path / "swept"
    argv = ["edit", "--model", str(tiny_ckpt), "--image", str(CAT), "--source", CAT_PROMPT,
            "--target", TIGER, "--steps", "3", "--size", "64", "--no-attention-maps",
            "--method", "null-text", "--inner-steps", "2", "--cross-end", "0.2",
            "--out", str(out), "--sweep", "cross_end=0.2,0.8", "--sweep", "self_end=0,0.5"]
    assert main(argv) == 0
    assert len(seen["optimise"]) == 1  # the sweep re-used the run's ∅
    (edit,), (cells,) = seen["edit"], seen["sweep"]
    assert cells.shape == (4, 4, 8, 6)  # the 3:4 photo at --size 64
    assert torch.equal(cells[1], edit[1])  # cross_end 0.2 · self_end 0.5 = the run's settings
    assert not torch.equal(cells[0], edit[1])
    report = json.loads((out / "report.json").read_text())
    entry = report["sweep"]
    assert entry["rows"] == ["cross_end 0.2", "cross_end 0.8"]
    assert entry["columns"] == ["self_end 0", "self_end 0.5"]
    assert TIGER in entry["edit"]
    with Image.open(entry["path"]) as grid:
        assert grid.width > 2 * 256 and grid.height > 2 * 256
    capsys.readouterr()
    assert main(argv + ["--sweep", "blend_start=0.1"]) == 2
    assert "error: a sweep has at most two axes (rows × columns), got 3" in capsys.readouterr().err
    assert main(argv[:-4] + ["--sweep", "self_end=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: sweep cell self_end 2: self_end must be a fraction in [0, 1], got 2.0"
    assert len(seen["optimise"]) == 1  # both refused before anything loaded


def test_help_page_lists_every_sweepable_field() -> None:
    from core_support import ROOT

    from nti_core.sweep import SWEEPABLE

    page = (ROOT / "web" / "docs" / "NTIP2PSweep.md").read_text(encoding="utf-8")
    assert [f for f in SWEEPABLE if f"`{f}" not in page] == []


def test_loss_plot_draws_final_below_first() -> None:
    """The CLI's loss.png: the final losses (dark) lie below the first (light) on the log axis."""
    import numpy as np

    from nti_core.images import loss_plot

    img = loss_plot([1.0, 0.5, 0.2], [1e-3, 1e-3, 1e-3])
    assert img.shape == (200, 480, 3) and img.dtype == np.uint8

    def rows_of(colour: tuple[int, int, int]) -> np.ndarray:
        return np.nonzero((np.abs(img.astype(int) - colour).sum(-1) < 30).any(1))[0]

    light, dark = rows_of((150, 190, 240)), rows_of((20, 60, 160))
    assert light.size and dark.size and dark.min() > light.max()  # image rows grow downwards
    with pytest.raises(ValueError, match="as many first as final losses"):
        loss_plot([1.0], [])
