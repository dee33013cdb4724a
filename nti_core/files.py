"""Save and load an inversion (pivot trajectory + per-step ∅) as one .safetensors file.

Written atomically (temporary file in the same folder, then ``os.replace``); loading checks the
format and, given the model's family or fingerprint, refuses an inversion made with another family
or other weights. The metadata names the family (``family``: "sd1", "sd2", "sdxl"); files written
before it are read from their embedding's shape (all of them SD 1.x).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .denoiser import same_model
from .family import FAMILIES, Family, for_embedding
from .schedule import grid_from_file
from .trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings

# 2: the reference grid is 981…1 (StableDiffusionPipeline's offset); 3: optional attention maps
# and StyleDiffusion value embeddings
FORMAT = "nti-inversion/3"
READABLE = ("nti-inversion/1", "nti-inversion/2", FORMAT)

log = logging.getLogger(__name__)


def save_inversion(path: str | Path, traj: Trajectory, uncond: UncondEmbeddings | None,
                   values: ValueEmbeddings | None = None, family: Family | None = None) -> Path:
    """Write ``traj`` (and ``uncond``, StyleDiffusion's ``values`` when given) to ``path``;
    returns the path written. ``family``: the model's (default: the one whose embedding shape
    ``traj.embedding`` has), named in the metadata."""
    from safetensors.torch import save_file

    if family is not None:
        family.check(traj.embedding, "source embedding")
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p.with_suffix(p.suffix + ".safetensors") if p.suffix else p.with_suffix(".safetensors")
    tensors: dict[str, Tensor] = {
        "latents": traj.latents,
        "embedding": traj.embedding,
        "fingerprint": traj.fingerprint,
        "grid_alphas": traj.grid.alphas,
        "grid_timesteps": torch.tensor(traj.grid.timesteps, dtype=torch.int64),
    }
    if traj.maps is not None:
        tensors["maps"] = traj.maps
    meta = {
        "format": FORMAT,
        "prompt": traj.prompt,
        "grid_kind": traj.grid.kind,
        "grid_alpha_end": repr(traj.grid.alpha_end),
    }
    key = family.key if family is not None else _family_key(traj.embedding)
    if key is not None:
        meta["family"] = key
    if family is not None:
        meta["family_label"] = family.label
    if uncond is not None:
        if uncond.num_steps != traj.num_steps:
            raise ValueError(f"∅ has {uncond.num_steps} steps, the trajectory {traj.num_steps}")
        tensors["uncond"] = uncond.embeddings
        meta["uncond"] = json.dumps({
            "method": uncond.method, "guidance": uncond.guidance, "final_loss": uncond.final_loss,
            "first_loss": uncond.first_loss, "iterations": uncond.iterations,
            "seconds": uncond.seconds, "attention_weight": uncond.attention_weight,
            "attention_loss": uncond.attention_loss, "precision": uncond.precision,
            "skipped": uncond.skipped, "compute": uncond.compute,
        })
    if values is not None:
        values.check_for(traj)
        tensors["value_shift"] = values.shift
        tensors["value_pivot"] = values.pivot
        if values.scale is not None:
            tensors["value_scale"] = values.scale
        meta["values"] = json.dumps({
            "variant": values.variant, "encoder": values.encoder, "guidance": values.guidance,
            "prompt": values.prompt, "final_loss": values.final_loss,
            "first_loss": values.first_loss, "iterations": values.iterations,
            "attention_weight": values.attention_weight, "attention_loss": values.attention_loss,
            "seconds": values.seconds, "precision": values.precision, "skipped": values.skipped,
            "compute": values.compute,
        })
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _family_key(embedding: Tensor) -> str | None:
    """The family whose embedding shape this is, or None for a shape no family has."""
    try:
        return for_embedding(embedding).key
    except ValueError:
        return None


def load_inversion(
    path: str | Path, fingerprint: Tensor | None = None, device: torch.device | str = "cpu",
    family: Family | None = None,
) -> tuple[Trajectory, UncondEmbeddings | None]:
    """Read a file written by :func:`save_inversion`; with ``family`` refuse an inversion of
    another family, with ``fingerprint`` one of other weights."""
    traj, uncond, _ = load_inversion_all(path, fingerprint, device, family)
    return traj, uncond


def load_inversion_all(
    path: str | Path, fingerprint: Tensor | None = None, device: torch.device | str = "cpu",
    family: Family | None = None,
) -> tuple[Trajectory, UncondEmbeddings | None, ValueEmbeddings | None]:
    """Like :func:`load_inversion`, with StyleDiffusion's value embeddings (None if absent)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no inversion file at {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p.name} is not a safetensors file: {e}") from e
    if meta.get("format") not in READABLE:
        raise ValueError(f"{p.name} is not an inversion file (format {meta.get('format')!r}, "
                         f"expected one of {READABLE})")
    grid = grid_from_file(meta["grid_kind"], tuple(int(x) for x in t["grid_timesteps"].tolist()),
                          t["grid_alphas"], float(meta["grid_alpha_end"]))
    if grid.kind != meta["grid_kind"]:
        log.warning("[NTI] %s carries the grid %s", p.name, grid.describe())
    made_with = meta.get("family") or _family_key(t["embedding"])
    if family is not None and made_with != family.key:
        other = FAMILIES[made_with].name if made_with in FAMILIES else f"unknown ({made_with})"
        raise ValueError(f"{p.name} is an inversion made with an {other} model, but the model "
                         f"connected is {family.name}: invert the image again with this model")
    maps = t["maps"].to(device) if "maps" in t else None
    traj = Trajectory(t["latents"].to(device), grid, meta["prompt"], t["embedding"].to(device),
                      t["fingerprint"], maps)
    if fingerprint is not None and not same_model(traj.fingerprint, fingerprint):
        raise ValueError(
            f"{p.name} was made with a different model than the one connected: invert the image "
            "again with this model, or connect the model it was made with"
        )
    uncond = None
    if "uncond" in t:
        info = json.loads(meta["uncond"])
        uncond = UncondEmbeddings(t["uncond"].to(device), info["method"], float(info["guidance"]),
                                  info["final_loss"], info["first_loss"], info["iterations"],
                                  float(info["seconds"]), float(info.get("attention_weight", 0.0)),
                                  info.get("attention_loss", []), info.get("precision", ""),
                                  int(info.get("skipped", 0)), info.get("compute", ""))
    values = None
    if "value_shift" in t:
        v = json.loads(meta["values"])
        values = ValueEmbeddings(
            t["value_shift"].to(device), t["value_scale"].to(device) if "value_scale" in t else None,
            v["variant"], v["encoder"], float(v["guidance"]), v["prompt"], t["value_pivot"],
            v["final_loss"], v["first_loss"], v["iterations"], float(v["attention_weight"]),
            v["attention_loss"], float(v["seconds"]), v.get("precision", ""),
            int(v.get("skipped", 0)), v.get("compute", ""))
    return traj, uncond, values
