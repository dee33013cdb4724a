"""The command line: the demo's report, and one-line errors for bad input before any work."""

from __future__ import annotations

import json

import pytest

from nti_core.cli import main


def test_demo_writes_images_and_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "6", "--size", "128"]) == 0
    report = json.loads((out / "report.json").read_text())
    rec = report["reconstruction_at_guidance_7.5"]
    assert rec["null-text"]["latent_mse"] < rec["ddim"]["latent_mse"] / 5
    assert rec["negative-prompt"]["latent_mse"] < rec["ddim"]["latent_mse"]
    assert len(report["null_text"]["iterations"]) == 6
    for name in ("replace+blend", "refine", "reweight"):
        e = report["edits"][name]
        assert e["edit_change_mse"] > 0
        # the source row of every edit is the null-text reconstruction
        assert e["source_row_equals_null_text_reconstruction_mse"] == pytest.approx(
            rec["null-text"]["latent_mse"], rel=1e-4)
        assert (out / f"edit_{name}.png").is_file()
    for name in ("input", "reconstruction_ddim", "reconstruction_null-text"):
        assert (out / f"{name}.png").is_file()
    printed = capsys.readouterr().out
    assert "null-text" in printed and str(out.resolve()) in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "no image at"),
        (["--source", "  "], "source prompt is empty"),
        (["--target", "a big dog sitting next to a mirror", "--mode", "replace"],
         "same number of words"),
        (["--reweight", "zebra:2"], "zebra"),
        (["--size", "100"], "multiple of 8"),
        (["--model", "nowhere"], "no model at"),
    ],
)
def test_edit_errors_are_one_line(tmp_path, capsys, args, message):
    from core_support import CAT

    base = {"--model": str(tmp_path), "--image": str(CAT), "--source": "a cat sitting next to a mirror",
            "--target": "a dog sitting next to a mirror", "--size": "64", "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["edit"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message in err
