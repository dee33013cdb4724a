"""bench/inversion.py runs end to end (tiny settings) and writes the JSON the README describes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_inversion_bench_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "inversion.py"), "--size", "64", "--steps", "3",
           "--photos", "gnochi_mirror", "--methods", "reference,null-text-fast,direct",
           "--p2p-size", "64", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    ref = result["reference"]
    assert ref.startswith("reference: transcription")  # no --diffusers: labelled so
    assert set(result["methods"]) == {ref, "null-text-fast", "direct"}
    for r in result["methods"].values():
        assert {"forward_equivalents", "wall_s", "peak_mb", "latent_mse", "psnr"} <= set(r)
        assert r["peak_mb"] > 0 and set(r["photos"]) == {"gnochi_mirror"}
    direct = result["methods"]["direct"]
    assert direct["forward_equivalents"] == 3  # the inversion only: one row per step
    assert direct["latent_mse"] <= 1e-6
    assert (result["methods"]["null-text-fast"]["forward_equivalents"]
            < result["methods"][ref]["forward_equivalents"])
    p2p = result["p2p"]
    assert p2p["p2p-baseline"]["label"].startswith("store-everything controller")
    assert p2p["engine_vs_baseline_max_abs"] < 1e-4  # the same edit, materialised differently
    assert "forward-equivalents" not in done.stdout and "fwd-eq" in done.stdout  # the table


def test_gpu_check_smoke_runs_every_family_and_precision(tmp_path: Path) -> None:
    """bench/gpu_check.py --smoke: the script prepared for the first GPU, at toy sizes on the
    CPU, so it cannot rot: every family × precision × method row, no NaN, the memory column."""
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["family"], r["precision"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(f, p, m) for f in ("demo", "sd15", "sdxl")
                         for p in ("fp32", "bf16", "fp16") for m in ("null-text-fast", "direct")}
    for key, r in rows.items():
        assert r["nan"] is None, (key, r["nan"])
        assert r["memory"] == "process_peak_rss_mb" and r["inversion_peak_mb"] > 0
        assert r["passes"] > 0 and r["latent_mse"] >= 0
        if key[2] == "direct":
            assert r["latent_mse"] == 0.0  # the source row is the pivot
        else:
            assert r["iterations"] > 0 and 0 < r["ratio_to_fp32"] < 3
    assert "| sdxl 64² | fp16 | null-text-fast |" in done.stdout


def test_memory_bench_prints_its_table_and_the_targets(tmp_path: Path) -> None:
    """bench/memory.py on SD 1.5 at 512² in fp16 (fake tensors: no memory, seconds): every
    stage, what the backward keeps, the 6 GB target's verdict and nti_core.memory's
    coefficient (which must be the one the hosts use)."""
    from nti_core.memory import SAVED_PER_PIXEL

    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "bench" / "memory.py"), "--families", "sd1", "--dtypes",
           "fp16", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert 1.6e9 < r["weights"] < 1.8e9  # 860 M parameters in fp16
    assert 0 < r["null-text + ckpt"]["saved"] < r["null-text"]["saved"] < 2 * r["weights"]
    assert "meets the 6 GB target" in done.stdout
    coef = json.loads(out.read_text())["coefficients"]["sd1"]["saved_per_pixel"]
    assert abs(coef - SAVED_PER_PIXEL["sd1"]) < 0.02 * SAVED_PER_PIXEL["sd1"]
