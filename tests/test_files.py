"""Inversion files: round trip, atomic write, model check, bad files."""

from __future__ import annotations

import pytest
import torch
from core_support import LinearDenoiser

from nti_core import ddim_invert, make_grid, negative_prompt_inversion
from nti_core.files import load_inversion, save_inversion
from nti_core.schedule import scaled_linear_alphas_cumprod


@pytest.fixture()
def inversion():
    den = LinearDenoiser(a=0.01)
    grid = make_grid(scaled_linear_alphas_cumprod(), 6, "ddim_uniform")
    z0 = torch.randn(1, 4, 8, 8)
    c = torch.randn(1, 77, 768)
    traj = ddim_invert(den, z0, c, grid, "a cat sitting next to a mirror")
    return den, traj, negative_prompt_inversion(traj)


def test_round_trip_keeps_everything(tmp_path, inversion):
    den, traj, npi = inversion
    p = save_inversion(tmp_path / "cat", traj, npi)
    assert p.name == "cat.safetensors" and p.is_file()
    assert [x.name for x in tmp_path.iterdir()] == ["cat.safetensors"]  # no temporary left
    t2, u2 = load_inversion(p, den.fingerprint())
    assert torch.equal(t2.latents, traj.latents) and torch.equal(t2.embedding, traj.embedding)
    assert t2.prompt == traj.prompt and t2.grid.timesteps == traj.grid.timesteps
    assert t2.grid.alpha_end == traj.grid.alpha_end and t2.grid.kind == "ddim_uniform"
    assert torch.equal(t2.grid.alphas, traj.grid.alphas)
    assert u2 is not None and torch.equal(u2.embeddings, npi.embeddings)
    assert u2.method == "negative-prompt" and u2.guidance == 7.5


def test_the_optimisations_precision_travels_with_the_file(tmp_path, inversion):
    """What sampling needs to know (the dtype ∅ was optimised in) and the report's precision
    line are saved; a file without them (written before) loads with none."""
    import dataclasses

    den, traj, npi = inversion
    made = dataclasses.replace(npi, compute="bfloat16", skipped=2,
                               precision="precision model: UNet forward and backward in bf16")
    _, u2 = load_inversion(save_inversion(tmp_path / "bf16", traj, made), den.fingerprint())
    assert (u2.compute, u2.skipped, u2.precision) == (made.compute, 2, made.precision)
    _, u3 = load_inversion(save_inversion(tmp_path / "plain", traj, npi), den.fingerprint())
    assert (u3.compute, u3.skipped, u3.precision) == ("", 0, "")


def test_other_model_is_refused(tmp_path, inversion):
    _, traj, npi = inversion
    p = save_inversion(tmp_path / "cat.safetensors", traj, npi)
    with pytest.raises(ValueError, match="different model"):
        load_inversion(p, LinearDenoiser(seed=5).fingerprint())


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no inversion file"):
        load_inversion(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_inversion(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not an inversion file"):
        load_inversion(other)


def test_failed_write_leaves_existing_file(tmp_path, inversion, monkeypatch):
    _, traj, npi = inversion
    p = save_inversion(tmp_path / "cat.safetensors", traj, npi)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_inversion(p, traj, npi)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_inversion(tmp_path / "dog.safetensors", traj, npi)
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["cat.safetensors"]


def test_format_1_file_loads_and_names_its_grid(tmp_path, caplog):
    """Files written before format 2 called 980…0 "reference": they load as that grid, named."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from nti_core.schedule import LEGACY_REFERENCE, Grid

    den = LinearDenoiser(a=0.01)
    ac = scaled_linear_alphas_cumprod()
    ts = tuple(range(980, -1, -196))
    old_grid = Grid("reference", ts, ac[list(ts)], float(ac[0]))
    traj = ddim_invert(den, torch.randn(1, 4, 8, 8), torch.randn(1, 77, 768), old_grid, "a cat")
    p = save_inversion(tmp_path / "old", traj, negative_prompt_inversion(traj))
    with safe_open(str(p), framework="pt") as f:  # rewrite it as the format-1 writer did
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(p), metadata={**meta, "format": "nti-inversion/1"})
    with caplog.at_level("WARNING"):
        t2, u2 = load_inversion(p, den.fingerprint())
    assert t2.grid.kind == LEGACY_REFERENCE and t2.grid.timesteps == ts
    assert torch.equal(t2.latents, traj.latents) and u2 is not None
    assert "980…0" in caplog.text and "invert again" in caplog.text
