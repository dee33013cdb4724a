"""The command line: the demo's report, and one-line errors for bad input before any work."""

from __future__ import annotations

import json

import pytest

from nti_core.app import main


def test_demo_writes_images_a_contact_sheet_and_a_report(tmp_path, capsys, caplog):
    out = tmp_path / "demo"
    with caplog.at_level("INFO", logger="nti_core"):
        assert main(["demo", "--out", str(out), "--steps", "8", "--size", "128"]) == 0
    report = json.loads((out / "report.json").read_text())
    rec = report["reconstruction_at_guidance_7.5"]
    ddim, npi, nti = (rec[k]["latent_mse"] for k in ("ddim", "negative-prompt", "null-text"))
    # measured at 128², 8 steps: DDIM 0.018, NPI 0.0057, NTI 0.00057 (the papers' order)
    assert nti < ddim / 10 and npi < ddim / 2 and nti < npi / 3
    assert rec["null-text"]["psnr_db"] > rec["ddim"]["psnr_db"]
    assert report["vae_roundtrip_psnr_db"] > 22
    assert len(report["null_text"]["iterations"]) == 8
    assert rec["direct"]["latent_mse"] == 0.0  # Direct Inversion: the source row is the pivot
    # measured at 128², 8 steps: fast null-text 0.00021, below the paper's (every step of both
    # spends the budget here: at 8 steps the DDIM step error is large)
    assert rec["null-text-fast"]["latent_mse"] < nti
    assert sum(report["null_text_fast"]["iterations"]) <= sum(report["null_text"]["iterations"])
    from nti_core.app.demo import DEMO_EDITS

    for name, _, _ in DEMO_EDITS:
        e = report["edits"][name]
        assert e["edit_change_mse"] > 0
        # the source row of every edit is the null-text reconstruction
        assert e["source_row_latent_mse"] == pytest.approx(nti, rel=1e-4)
        assert (out / f"edit_{name}.png").is_file()
    for name in ("input", "input_vae_roundtrip", "reconstruction_ddim", "reconstruction_null-text",
                 "reconstruction_negative-prompt", "reconstruction_null-text-fast",
                 "reconstruction_direct", "contact_sheet"):
        assert (out / f"{name}.png").is_file()
    from PIL import Image

    with Image.open(out / "contact_sheet.png") as sheet:  # 7 columns of 256 px tiles, 2 rows
        assert sheet.width > 7 * 256 and sheet.height > 2 * 256
    printed = capsys.readouterr().out
    assert "null-text" in printed and str(out.resolve()) in printed
    # progress: numbered phases, and without a terminal a line per tenth of a long phase
    assert "[1/5] load the demo model" in caplog.text and "[5/5]" in caplog.text
    assert "null-text optimisation (the paper's, then the fast mode): 8/16" in caplog.text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "no image at"),
        (["--source", "  "], "source prompt is empty"),
        (["--target", "a big dog sitting next to a mirror", "--edit-kind", "replace"],
         "same number of words"),
        (["--reweight", "zebra:2"], "zebra"),
        (["--size", "100"], "multiple of 8"),
        (["--model", "nowhere"], "no model at"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--inner-steps", "0"], "--inner-steps must be at least 1"),
        (["--steps", "1000"], "at most 999 steps"),
        (["--model", "MODEL.ckpt"], "pickled .ckpt checkpoints are not loaded"),
    ],
)
def test_edit_errors_are_one_line(tmp_path, capsys, args, message):
    from core_support import CAT

    base = {"--model": str(tmp_path), "--image": str(CAT), "--source": "a cat sitting next to a mirror",
            "--target": "a dog sitting next to a mirror", "--size": "64", "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    if base["--model"] == "MODEL.ckpt":
        base["--model"] = str(tmp_path / "model.ckpt")
        (tmp_path / "model.ckpt").write_bytes(b"a pickle")
    argv = ["edit"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert message in err


def test_model_path_error_comes_alone(tmp_path):
    """A wrong --model is reported before diffusers is imported: one line, no library warnings."""
    import subprocess
    import sys

    from core_support import CAT, ROOT

    done = subprocess.run(
        [sys.executable, "-m", "nti_core", "edit", "--model", str(tmp_path / "nowhere"),
         "--image", str(CAT), "--source", "a cat", "--target", "a dog", "--size", "64"],
        cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == f"error: no model at {tmp_path / 'nowhere'}\n"


def test_help_shows_every_default_and_no_ckpt(capsys):
    from nti_core.app import parser

    sub = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, p in sub.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: 50)" in text and "(default: 0.8)" in text and "(default: 32x32)" in text
    assert ".ckpt" not in text
