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
