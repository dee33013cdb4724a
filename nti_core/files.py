"""Save and load an inversion (pivot trajectory + per-step ∅) as one .safetensors file.

Nothing is unpickled: a safetensors file is a JSON header and raw tensor bytes, and the metadata
is JSON. Writing is atomic and never replaces a file: the tensors go to a temporary file in the
same folder, which then takes the final name by a hard link (where the filesystem has none, by
replacing a placeholder created exclusively), so a name taken meanwhile is passed over and a
failed or interrupted write leaves nothing behind.

Loading checks the header before any tensor is read — the format (older ones load, a newer one
is refused by name), the tensors present and their shapes against each other — then the SHA-256
the file was saved with (files saved before it have none), so a byte changed anywhere gives an
error, never another inversion; given the model's family or fingerprint, it refuses an inversion
made with another family or other weights. The metadata names the family (``family``: "sd1",
"sd2", "sdxl"); files written before it are read from their embedding's shape (all SD 1.x).
Names given by a user are checked by :func:`confined` before anything is read or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .denoiser import same_model
from .family import FAMILIES, Family, for_embedding
from .schedule import grid_from_file
from .trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings

# 2: the reference grid is 981…1 (StableDiffusionPipeline's offset); 3: optional attention maps
# and StyleDiffusion value embeddings (later additions to 3 are optional and read with defaults)
PREFIX = "nti-inversion/"
VERSION = 3
FORMAT = f"{PREFIX}{VERSION}"
READABLE = tuple(f"{PREFIX}{v}" for v in range(1, VERSION + 1))
SUFFIX = ".safetensors"
NAME_BYTES = 200  # per folder level: filesystems take 255, and "_00001.safetensors" follows
NUMBERED_TRIES = 100  # names another save may take from under Save Inversion, one after another

# tensor → (kind of values, shape); a name is one size wherever it appears, N the grid's steps
LAYOUT: dict[str, tuple[str, tuple[str | int, ...]]] = {
    "grid_timesteps": ("integer", ("N",)),
    "grid_alphas": ("float", ("N",)),
    "latents": ("float", ("N+1", "C", "h", "w")),
    "embedding": ("float", (1, "L", "D")),
    "fingerprint": ("float", ("F",)),
    "maps": ("float", ("N", "layers", "heads", "positions", "tokens")),
    "uncond": ("float", ("N", "L", "D")),
    "value_shift": ("float", ("N", "Lv", "Dv")),
    "value_scale": ("float", ("N", "Lv", "Dv")),
    "value_pivot": ("float", ("P",)),
}
REQUIRED = ("grid_timesteps", "grid_alphas", "latents", "embedding", "fingerprint")
UNCOND_KEYS = ("method", "guidance", "final_loss", "first_loss", "iterations", "seconds")
VALUES_KEYS = ("variant", "encoder", "guidance", "prompt", "final_loss", "first_loss",
               "iterations", "attention_weight", "attention_loss", "seconds")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ names


def _shown(name: str) -> str:
    """``name`` quoted for a message, cut after 80 characters."""
    return repr(name if len(name) <= 80 else name[:77] + "…")


def check_name(name: Any, what: str, where: str) -> None:
    """Refuse a relative file name that could leave its folder or that no filesystem takes:
    not a string, empty, with a control character (NUL, newline…), absolute (/x, \\\\server,
    C:\\x), with a '..' part (either slash), or a part longer than NAME_BYTES bytes."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a file name, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} is empty: give a file name inside {where}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"{what} {_shown(name)} contains a control character (NUL, newline…): "
                         "remove it")
    if name[0] in "/\\" or re.match(r"[A-Za-z]:", name) or os.path.isabs(name):
        raise ValueError(f"{what} {_shown(name)} is an absolute path: give a file name inside "
                         f"{where}")
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        raise ValueError(f"{what} {_shown(name)} leads outside {where} with '..': give a file "
                         f"name inside {where}")
    longest = max(len(p.encode("utf-8", "surrogatepass")) for p in parts)
    if longest > NAME_BYTES:
        raise ValueError(f"{what} {_shown(name)} has a part of {longest} bytes: file names are "
                         f"limited to {NAME_BYTES} bytes per folder level")


def inside(root: str | Path, path: str | Path) -> bool:
    """Whether ``path``, symbolic links followed, is ``root`` or under it."""
    base, real = os.path.realpath(root), os.path.realpath(path)
    try:
        return os.path.commonpath([base, real]) == base
    except ValueError:  # another drive
        return False


def confined(root: str | Path, name: Any, what: str, where: str) -> Path:
    """``root/name`` once :func:`check_name` passes and, symbolic links followed, it stays in
    ``root`` (``where`` names that folder in messages)."""
    check_name(name, what, where)
    path = Path(root) / name
    if not inside(root, path):
        raise ValueError(f"{what} {_shown(name)} leads outside {where} through a symbolic link "
                         f"(to {os.path.realpath(path)}): keep inversion files inside {where}")
    return path


def inversion_path(path: str | Path) -> Path:
    """``path`` with ``.safetensors`` appended unless it ends so."""
    p = Path(path)
    return p if p.suffix == SUFFIX else p.with_name(p.name + SUFFIX)


def next_path(folder: str | Path, name: str) -> Path:
    """``<folder>/<name>_NNNNN.safetensors`` with NNNNN one past the highest already there."""
    pattern = re.compile(rf"{re.escape(name)}_(\d+){re.escape(SUFFIX)}", re.IGNORECASE)
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.fullmatch(f))]
    return Path(folder) / f"{name}_{max(numbers, default=0) + 1:05d}{SUFFIX}"


# ------------------------------------------------------------------------------ saving


def save_inversion(path: str | Path, traj: Trajectory, uncond: UncondEmbeddings | None,
                   values: ValueEmbeddings | None = None, family: Family | None = None) -> Path:
    """Write ``traj`` (and ``uncond``, StyleDiffusion's ``values`` when given) to ``path``
    (``.safetensors`` appended unless it ends so); returns the path written. An existing file is
    never replaced (FileExistsError). ``family``: the model's (default: the one whose embedding
    shape ``traj.embedding`` has), named in the metadata."""
    p = new_inversion_path(path)
    return _write(_contents(traj, uncond, values, family), p.parent, [p])


def new_inversion_path(path: str | Path) -> Path:
    """``path`` as :func:`save_inversion` writes it; FileExistsError, naming it, where a file is
    (the command line checks this before anything runs)."""
    p = inversion_path(path)
    if os.path.lexists(p):
        raise _exists(p)
    return p


def save_numbered(folder: str | Path, name: str, traj: Trajectory,
                  uncond: UncondEmbeddings | None, values: ValueEmbeddings | None = None,
                  family: Family | None = None) -> Path:
    """Like :func:`save_inversion`, as ``<folder>/<name>_NNNNN.safetensors`` with NNNNN one past
    the highest there (Save Inversion's names); a name another save takes meanwhile is passed
    over, never replaced."""
    names = (next_path(folder, name) for _ in range(NUMBERED_TRIES))
    return _write(_contents(traj, uncond, values, family), Path(folder), names)


def _exists(p: Path) -> FileExistsError:
    return FileExistsError(f"{p} exists: inversion files are never overwritten — give another "
                           "name, or move that file away")


def _contents(traj: Trajectory, uncond: UncondEmbeddings | None, values: ValueEmbeddings | None,
              family: Family | None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of an inversion file."""
    if family is not None:
        family.check(traj.embedding, "source embedding")
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
    meta["sha256"] = _digest(tensors, meta)
    return tensors, meta


def _digest(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """SHA-256 of the metadata and of every tensor's name, dtype, shape and bytes. Neither the
    digest nor the format enters it: the format is checked on its own, and every readable
    format is read alike."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k not in ("sha256", "format")},
                                  sort_keys=True).encode())
    for k in sorted(tensors):
        v = tensors[k].contiguous()
        h.update(f"{k} {v.dtype} {list(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).cpu().numpy())  # CPU already: a no-op
    return h.hexdigest()


def _write(contents: tuple[dict[str, Tensor], dict[str, str]], folder: Path,
           names: Iterable[Path]) -> Path:
    """Write ``contents`` to a temporary file in ``folder``, flushed to disk, and give it the
    first of ``names`` no file has; the temporary file is gone afterwards, whatever happens."""
    from safetensors.torch import save_file

    tensors, meta = contents
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".nti-inversion-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        for p in names:
            try:
                _claim(tmp, p)
                return p
            except FileExistsError:
                taken = p
        raise _exists(taken)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _claim(tmp: str, p: Path) -> None:
    """Give the file ``tmp`` the name ``p`` too unless a file has it (FileExistsError): a hard
    link, or where the filesystem has none (FAT, some network shares) an exclusively created
    placeholder that ``tmp`` then replaces."""
    try:
        os.link(tmp, p)
        return
    except FileExistsError:
        raise
    except OSError:
        log.debug("[NTI] no hard link in %s: a placeholder claims %s", p.parent, p.name)
    os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    try:
        os.replace(tmp, p)
    except BaseException:
        p.unlink(missing_ok=True)
        raise


def _family_key(embedding: Tensor) -> str | None:
    """The family whose embedding shape this is, or None for a shape no family has."""
    try:
        return for_embedding(embedding).key
    except ValueError:
        return None


# ------------------------------------------------------------------------------ loading


def load_inversion(
    path: str | Path, fingerprint: Tensor | None = None, device: torch.device | str = "cpu",
    family: Family | None = None,
) -> tuple[Trajectory, UncondEmbeddings | None]:
    """Read a file written by :func:`save_inversion`; with ``family`` refuse an inversion of
    another family, with ``fingerprint`` one of other weights."""
    traj, uncond, _ = load_inversion_all(path, fingerprint, device, family)
    return traj, uncond


def check_inversion_file(path: str | Path) -> str:
    """The format of the inversion file at ``path``, checked from its header alone (no tensor is
    read); a ValueError says what is wrong."""
    p = _existing(path)
    with _opened(p) as f:
        return _check_header(p.name, f)


def load_inversion_all(
    path: str | Path, fingerprint: Tensor | None = None, device: torch.device | str = "cpu",
    family: Family | None = None,
) -> tuple[Trajectory, UncondEmbeddings | None, ValueEmbeddings | None]:
    """Like :func:`load_inversion`, with StyleDiffusion's value embeddings (None if absent)."""
    p = _existing(path)
    with _opened(p) as f:
        fmt = _check_header(p.name, f)
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys() if k in LAYOUT}  # noqa: SIM118 (no iterator)
    if "sha256" in meta and _digest(t, meta) != meta["sha256"]:
        raise _damaged(p.name, fmt, "its contents do not match the SHA-256 it was saved with "
                       "(changed or damaged since)")
    nonfinite = [k for k, v in t.items() if v.is_floating_point() and not v.isfinite().all()]
    if nonfinite:
        raise _damaged(p.name, fmt, f"{', '.join(nonfinite)} hold NaN or infinite values")
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
                      t["fingerprint"].to(torch.float64), maps)
    if fingerprint is not None and not same_model(traj.fingerprint, fingerprint):
        raise ValueError(
            f"{p.name} was made with a different model than the one connected: invert the image "
            "again with this model, or connect the model it was made with"
        )
    uncond = None
    if "uncond" in t:
        info = _json(p.name, fmt, meta, "uncond", UNCOND_KEYS)
        try:
            uncond = UncondEmbeddings(
                t["uncond"].to(device), str(info["method"]), float(info["guidance"]),
                info["final_loss"], info["first_loss"], info["iterations"],
                float(info["seconds"]), float(info.get("attention_weight", 0.0)),
                info.get("attention_loss", []), info.get("precision", ""),
                int(info.get("skipped", 0)), info.get("compute", ""))
        except (TypeError, ValueError) as e:
            raise _damaged(p.name, fmt, f"the metadata 'uncond' holds a wrong value ({e})") from e
    values = None
    if "value_shift" in t:
        v = _json(p.name, fmt, meta, "values", VALUES_KEYS)
        try:
            values = ValueEmbeddings(
                t["value_shift"].to(device),
                t["value_scale"].to(device) if "value_scale" in t else None,
                str(v["variant"]), str(v["encoder"]), float(v["guidance"]), str(v["prompt"]),
                t["value_pivot"], v["final_loss"], v["first_loss"], v["iterations"],
                float(v["attention_weight"]), v["attention_loss"], float(v["seconds"]),
                v.get("precision", ""), int(v.get("skipped", 0)), v.get("compute", ""))
        except (TypeError, ValueError) as e:
            raise _damaged(p.name, fmt, f"the metadata 'values' holds a wrong value ({e})") from e
    return traj, uncond, values


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no inversion file at {p}")
    return p


@contextmanager
def _opened(p: Path) -> Iterator[Any]:
    """``safe_open`` on ``p``; what safetensors or the disk refuse becomes one ValueError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{p.name} is not a readable safetensors file ({e}): it is truncated, "
                         "damaged or another kind of file — copy it again whole, or save the "
                         "inversion again") from e


def _damaged(name: str, fmt: str, what: str) -> ValueError:
    return ValueError(f"{name} is a damaged inversion file ({fmt}): {what} — save the inversion "
                      "again")


def _check_header(name: str, f: Any) -> str:
    """The file's format once its metadata and tensor shapes fit together (header only)."""
    meta = f.metadata() or {}
    header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
              for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    fmt = meta.get("format")
    if fmt not in READABLE:
        version = re.fullmatch(rf"{re.escape(PREFIX)}(\d+)", fmt or "", re.ASCII)
        if version and int(version.group(1)) > VERSION:
            raise ValueError(f"{name} was saved by a newer version of this pack (format {fmt}; "
                             f"this version reads {', '.join(READABLE)}): update the pack to "
                             "load it")
        keys = sorted(header)
        held = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        found = "no format" if fmt is None else f"the format {_shown(fmt)}"
        raise ValueError(f"{name} is not an inversion file: its metadata has {found}, expected "
                         f"one of {', '.join(READABLE)} (it holds {held or 'no tensors'}) — a "
                         "checkpoint, LoRA or other safetensors file? Choose a file saved by "
                         "Save Inversion (NTI)")
    missing = [k for k in REQUIRED if k not in header]
    wanted = ["prompt", "grid_kind", "grid_alpha_end"]
    wanted += ["uncond"] if "uncond" in header else []
    wanted += ["values"] if "value_shift" in header else []
    missing += [f"the metadata {k!r}" for k in wanted if k not in meta]
    if "value_shift" in header and "value_pivot" not in header:
        missing.append("value_pivot")
    if "value_scale" in header and "value_shift" not in header:
        missing.append("value_shift")
    if missing:
        raise _damaged(name, fmt, f"it lacks {', '.join(missing)}")
    sizes: dict[str, tuple[int, str]] = {}  # size name → (size, the tensor that set it)
    for key, (kind, spec) in LAYOUT.items():
        if key not in header:
            continue
        dtype, shape = header[key]
        held = ("float" if dtype.startswith(("F", "BF"))
                else "integer" if dtype.startswith(("I", "U")) else dtype)
        if held != kind:
            raise _damaged(name, fmt, f"{key} holds {dtype} values, expected {kind} values")
        bound = _bind(shape, spec, sizes, key)
        if bound is None:
            names = {str(d).removesuffix("+1") for d in spec}
            known = "; ".join(f"{s} = {n} (from {src})" for s, (n, src) in sizes.items()
                              if s in names)
            raise _damaged(name, fmt, f"{key} has the shape {list(shape)}, expected "
                           f"[{', '.join(map(str, spec))}]" + (f" where {known}" if known else ""))
        sizes.update(bound)
    if sizes["N"][0] < 1:
        raise _damaged(name, fmt, "grid_timesteps is empty, expected one timestep per step")
    try:
        alpha_end = float(meta["grid_alpha_end"])
    except ValueError:
        alpha_end = float("nan")
    if not 0 < alpha_end <= 1:
        raise _damaged(name, fmt, f"the metadata 'grid_alpha_end' is "
                       f"{_shown(meta['grid_alpha_end'])}, expected a number in (0, 1]")
    return fmt


def _bind(shape: tuple[int, ...], spec: tuple[str | int, ...], sizes: dict[str, tuple[int, str]],
          key: str) -> dict[str, tuple[int, str]] | None:
    """The sizes ``shape`` gives the names of ``spec`` that ``sizes`` lacks (set by ``key``), or
    None where it does not match ``spec`` and ``sizes``."""
    if len(shape) != len(spec):
        return None
    new: dict[str, tuple[int, str]] = {}
    for n, d in zip(shape, spec):
        base, plus = (d[:-2], 1) if isinstance(d, str) and d.endswith("+1") else (d, 0)
        if isinstance(base, int):
            want = base
        elif base in sizes or base in new:
            want = {**sizes, **new}[base][0] + plus
        else:
            new[base] = (n - plus, key)
            continue
        if n != want:
            return None
    return new


def _json(name: str, fmt: str, meta: dict[str, str], key: str,
          needed: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object in the metadata ``key``, with the ``needed`` fields."""
    try:
        info = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise _damaged(name, fmt, f"the metadata {key!r} is not JSON ({e})") from e
    if not isinstance(info, dict):
        raise _damaged(name, fmt, f"the metadata {key!r} is {type(info).__name__}, expected "
                       "a JSON object")
    missing = [k for k in needed if k not in info]
    if missing:
        raise _damaged(name, fmt, f"the metadata {key!r} lacks {', '.join(missing)}")
    return info
