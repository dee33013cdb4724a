"""Inversion files against what the world does to files: nothing unpickled anywhere, writes that
never leave a partial file nor replace one, names that cannot leave ComfyUI's folders, and bad
files (truncated, corrupt, foreign, lying, newer or older) each loaded or refused by name.

The Save/Load Inversion tests need $COMFYUI_PATH (skipped, saying so, without it)."""

from __future__ import annotations

import ast
import dataclasses
import errno
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from core_support import LinearDenoiser

from nti_core import ddim_invert, make_grid, negative_prompt_inversion
from nti_core.family import FAMILIES
from nti_core.files import (
    FORMAT,
    check_inversion_file,
    check_name,
    confined,
    load_inversion,
    load_inversion_all,
    save_inversion,
    save_numbered,
)
from nti_core.schedule import LEGACY_REFERENCE, Grid, scaled_linear_alphas_cumprod
from nti_core.trajectory import UncondEmbeddings, ValueEmbeddings, pivot_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [*sorted((ROOT / "nti_core").rglob("*.py")), *sorted((ROOT / "nodes").rglob("*.py")),
           ROOT / "__init__.py"]
PROMPT = "a cat sitting next to a mirror"


def invert(grid_steps: int = 6, width: int = 768, tokens: int = 77, side: int = 8,
           grid: Grid | None = None) -> tuple[LinearDenoiser, Any, UncondEmbeddings]:
    """A pivot of the analytic denoiser and a ∅ with a null-text-like report."""
    den = LinearDenoiser(a=0.01)
    grid = grid or make_grid(scaled_linear_alphas_cumprod(), grid_steps)
    g = torch.Generator().manual_seed(0)
    traj = ddim_invert(den, torch.randn(1, 4, side, side, generator=g),
                       torch.randn(1, tokens, width, generator=g), grid, PROMPT)
    n = traj.num_steps
    uncond = dataclasses.replace(
        negative_prompt_inversion(traj), method="null-text", final_loss=[1e-4] * n,
        first_loss=[1e-2] * n, iterations=[3] * n, seconds=1.5)
    return den, traj, uncond


def contents(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def write(p: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta)
    return p


def refusal(p: Path) -> str:
    """The message loading ``p`` raises (a ValueError naming the file)."""
    with pytest.raises(ValueError) as e:
        load_inversion_all(p)
    assert p.name in str(e.value)
    return str(e.value)


# ============================================================== nothing is unpickled

# calls that unpickle (or run code from a file) and the imports that bring a pickler in
UNPICKLING_CALLS = {"torch.load", "torch.serialization.load", "torch.jit.load", "pickle.load",
                    "pickle.loads", "pd.read_pickle", "pandas.read_pickle", "yaml.load",
                    "yaml.unsafe_load", "joblib.load", "dill.load", "dill.loads"}
PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unpickling(source: str) -> list[str]:
    """What in ``source`` unpickles: pickler imports, unpickling calls, np.load(allow_pickle=True),
    and any ``weights_only=False``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLERS or any(
                    f"{node.module}.{a.name}" in UNPICKLING_CALLS for a in node.names):
                found.append(node.module)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            words = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if (name in UNPICKLING_CALLS
                    or name in ("np.load", "numpy.load") and words.get("allow_pickle") != "False"
                    or words.get("weights_only") == "False"):
                found.append(name)
    return found


def test_property_no_shipped_module_unpickles() -> None:
    """Inversion files and every other file the pack reads are safetensors or JSON: no shipped
    module imports a pickler or calls a loader that unpickles."""
    for bad in ("import pickle", "from torch import load", "torch.load(p)",
                "torch.load(p, weights_only=True)", "np.load(p, allow_pickle=True)",
                "np.load(p)", "x.from_pretrained(p, weights_only=False)"):
        assert unpickling(bad), bad  # the scan sees each way in
    assert not unpickling("np.load(p, allow_pickle=False)\nsafe_open(p, 'pt')")
    offenders = {str(f.relative_to(ROOT)): hits for f in SHIPPED
                 if (hits := unpickling(f.read_text()))}
    assert not offenders, offenders


# ============================================================== writing


def test_interrupt_or_failure_mid_write_leaves_no_partial_or_temporary_file(tmp_path,
                                                                           monkeypatch):
    """Half the bytes written, then the disk fills or the user presses Ctrl-C: neither the final
    name nor a temporary file is left, and the user's file beside it is untouched."""
    import safetensors.torch

    _, traj, uncond = invert()
    mine = save_inversion(tmp_path / "mine", traj, uncond)
    before = mine.read_bytes()
    real = safetensors.torch.save_file
    for failure in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        def half_then_fail(tensors, filename, metadata=None, failure=failure):
            real(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
            raise failure

        monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
        with pytest.raises(type(failure)):
            save_inversion(tmp_path / "new", traj, uncond)
        with pytest.raises(type(failure)):
            save_numbered(tmp_path, "run", traj, uncond)
        assert sorted(x.name for x in tmp_path.iterdir()) == ["mine.safetensors"]
        assert mine.read_bytes() == before


def test_interrupt_while_naming_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Interrupted after the write, while the file takes its name: no temporary file stays."""
    _, traj, uncond = invert()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_numbered(tmp_path, "run", traj, uncond)
    assert list(tmp_path.iterdir()) == []


def test_property_an_existing_file_is_never_overwritten(tmp_path):
    """Not a file, not a symbolic link (whose target would be written through)."""
    _, traj, uncond = invert()
    p = tmp_path / "cat.safetensors"
    p.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="inversion files are never overwritten"):
        save_inversion(p, traj, uncond)
    assert p.read_bytes() == b"the user's own file"
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "target.safetensors")
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_inversion(tmp_path / "link", traj, uncond)
    assert not (tmp_path / "target.safetensors").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cat.safetensors", "link.safetensors"]


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_property_a_name_taken_meanwhile_is_passed_over(tmp_path, monkeypatch, hard_links):
    """Save Inversion's numbering: between listing the folder and naming the file another save
    takes the number; that file is kept and ours takes the next number. The same without hard
    links (FAT, some network shares), where an exclusively created placeholder claims the name."""
    _, traj, uncond = invert()
    (tmp_path / "run_00001.safetensors").write_bytes(b"first")
    real_link = os.link
    raced = []

    def racing_link(src, dst):
        if not raced:  # another process saves under the name just chosen
            raced.append(Path(dst).name)
            Path(dst).write_bytes(b"theirs")
        if not hard_links:
            raise OSError(errno.EPERM, "Operation not permitted")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    first = save_numbered(tmp_path, "run", traj, uncond)
    second = save_numbered(tmp_path, "run", traj, uncond)
    assert raced == ["run_00002.safetensors"]
    assert (first.name, second.name) == ("run_00003.safetensors", "run_00004.safetensors")
    assert (tmp_path / "run_00001.safetensors").read_bytes() == b"first"
    assert (tmp_path / "run_00002.safetensors").read_bytes() == b"theirs"
    assert sorted(x.name for x in tmp_path.iterdir()) == [f"run_0000{i}.safetensors"
                                                          for i in range(1, 5)]
    t2, u2 = load_inversion(first)
    assert torch.equal(t2.latents, traj.latents) and torch.equal(u2.embeddings, uncond.embeddings)
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_inversion(second, traj, uncond)


# ============================================================== names


@pytest.mark.parametrize(("name", "message"), [
    ("../x", "leads outside the output folder with '..'"),
    ("..\\x", "with '..'"),
    ("nti/../../x", "with '..'"),
    ("nti\\..\\..\\x", "with '..'"),
    ("/etc/x", "is an absolute path"),
    ("C:\\x", "is an absolute path"),
    ("c:x", "is an absolute path"),
    ("\\\\server\\share\\x", "is an absolute path"),
    ("a\0b", "contains a control character"),
    ("a\nb", "contains a control character"),
    ("nti/" + "x" * 201, "has a part of 201 bytes"),
    ("é" * 101, "has a part of 202 bytes"),
    ("", "filename_prefix is empty"),
    (None, "filename_prefix must be a file name, got NoneType"),
])
def test_traversal_names_are_refused(tmp_path, name, message):
    with pytest.raises(ValueError, match=message):
        confined(tmp_path, name, "filename_prefix", "the output folder")


def test_traversal_through_a_symbolic_link_is_refused(tmp_path):
    """A link inside the folder that leads out of it is refused; one that stays inside, and
    names that only look odd, are fine."""
    root, outside = tmp_path / "output", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "nti").mkdir()
    (root / "in").symlink_to(root / "nti")
    with pytest.raises(ValueError, match=r"leads outside the output folder through a "
                       r"symbolic link \(to .*elsewhere"):
        confined(root, "out/inversion", "filename_prefix", "the output folder")
    for fine in ("in/inversion", "nti/inversion", "a..b", "...", "%year%/x", "ünï cödé",
                 "x" * 200):
        assert confined(root, fine, "filename_prefix", "here") == root / fine
        check_name(fine, "filename_prefix", "here")


# ============================================================== bad files


def test_corrupt_truncated_files_are_refused_by_name(tmp_path):
    """Cut anywhere — empty, inside the length, inside the header, inside the tensors, one byte
    short — the file is refused as unreadable, naming it."""
    _, traj, uncond = invert()
    whole = save_inversion(tmp_path / "whole", traj, uncond).read_bytes()
    header_end = 8 + struct.unpack("<Q", whole[:8])[0]
    for cut in (0, 1, 7, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1,
                len(whole) // 2, len(whole) - 1):
        p = tmp_path / f"cut_{cut}.safetensors"
        p.write_bytes(whole[:cut])
        msg = refusal(p)
        assert msg.startswith(f"{p.name} is not a readable safetensors file ("), msg
        assert msg.endswith("it is truncated, damaged or another kind of file — copy it again "
                            "whole, or save the inversion again"), msg
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            check_inversion_file(p)


def test_corrupt_random_bytes_and_a_lying_header_are_refused(tmp_path):
    """Random bytes named .safetensors; a header whose shape does not fit its bytes."""
    _, traj, uncond = invert()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    assert "is not a readable safetensors file" in refusal(junk)
    whole = save_inversion(tmp_path / "whole", traj, uncond).read_bytes()
    n = struct.unpack("<Q", whole[:8])[0]
    header = json.loads(whole[8 : 8 + n])
    header["latents"]["shape"][0] += 1  # claims one latent more than its bytes hold
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(text)) + text + whole[8 + n :])
    assert "invalid shape, data type, or offset" in refusal(lying)


def test_corrupt_any_changed_byte_gives_an_error_or_the_same_inversion(tmp_path):
    """Every single byte of a (small) file flipped in turn: each load either refuses the file
    with a ValueError naming it or returns exactly the inversion saved — only where the flip
    renames the checksum's own key, or turns format 3 into 2 (read alike)."""
    _, traj, uncond = invert(grid_steps=2, width=8, tokens=3, side=2)
    whole = save_inversion(tmp_path / "whole", traj, uncond).read_bytes()
    p = tmp_path / "flipped.safetensors"
    key = whole.index(b'"sha256"') + 1
    harmless = {whole.index(FORMAT.encode()) + len(FORMAT) - 1, *range(key, key + 6)}
    same = set()
    for i in range(len(whole)):
        p.write_bytes(whole[:i] + bytes([whole[i] ^ 0x01]) + whole[i + 1 :])
        try:
            t2, u2 = load_inversion(p)
        except ValueError as e:
            assert p.name in str(e)
            continue
        same.add(i)
        assert torch.equal(t2.latents, traj.latents) and t2.prompt == traj.prompt
        assert torch.equal(u2.embeddings, uncond.embeddings) and u2.final_loss == [1e-4] * 2
    assert same == harmless, (same, harmless)


@pytest.mark.parametrize(("tamper", "found"), [
    (lambda t, m: t.pop("latents"), "it lacks latents"),
    (lambda t, m: m.pop("prompt"), "it lacks the metadata 'prompt'"),
    (lambda t, m: m.pop("uncond"), "it lacks the metadata 'uncond'"),
    (lambda t, m: t.update(latents=t["latents"][1:]),
     "latents has the shape [6, 4, 8, 8], expected [N+1, C, h, w] where N = 6 (from "
     "grid_timesteps)"),
    (lambda t, m: t.update(uncond=t["uncond"][..., :512]),
     "uncond has the shape [6, 77, 512], expected [N, L, D] where N = 6 (from grid_timesteps); "
     "L = 77 (from embedding); D = 768 (from embedding)"),
    (lambda t, m: t.update(embedding=t["embedding"][0]),
     "embedding has the shape [77, 768], expected [1, L, D]"),
    (lambda t, m: t.update(grid_timesteps=t["grid_timesteps"].float()),
     "grid_timesteps holds F32 values, expected integer values"),
    (lambda t, m: t.update(maps=torch.zeros(6, 2, 8, 4)),
     "maps has the shape [6, 2, 8, 4], expected [N, layers, heads, positions, tokens] where "
     "N = 6 (from grid_timesteps)"),
    (lambda t, m: m.update(grid_alpha_end="0.9.9"),
     "the metadata 'grid_alpha_end' is '0.9.9', expected a number in (0, 1]"),
    (lambda t, m: m.update(uncond="{method: null-text"), "the metadata 'uncond' is not JSON (Expecting "
     "property name enclosed in double quotes: line 1 column 2 (char 1))"),
    (lambda t, m: m.update(uncond='{"method": "null-text"}'),
     "the metadata 'uncond' lacks guidance, final_loss, first_loss, iterations, seconds"),
    (lambda t, m: m.update(uncond=m["uncond"].replace('"guidance": 7.5', '"guidance": "high"')),
     "the metadata 'uncond' holds a wrong value (could not convert string to float: 'high')"),
    (lambda t, m: t["latents"].view(-1)[5].fill_(float("nan")), "latents hold NaN or infinite "
     "values"),
    (lambda t, m: t["uncond"].mul_(1.001), "its contents do not match the SHA-256 it was saved "
     "with (changed or damaged since)"),
], ids=["no-latents", "no-prompt", "no-report", "latents-short", "uncond-narrow", "embedding-2d",
        "float-timesteps", "maps-4d", "alpha-end", "report-not-json", "report-short",
        "report-value", "nan", "checksum"])
def test_corrupt_inversion_contents_are_refused_saying_what_and_where(tmp_path, tamper, found):
    """A well-formed safetensors file whose inversion does not hold together: one ValueError
    naming the file, its format, what was expected and what was found. What the header alone
    shows is refused without reading a tensor."""
    _, traj, uncond = invert()
    tensors, meta = contents(save_inversion(tmp_path / "good", traj, uncond))
    tamper(tensors, meta)
    if not found.startswith("its contents"):
        meta.pop("sha256")  # a file that lost its checksum too: the checks behind it speak
    p = write(tmp_path / "bad.safetensors", tensors, meta)
    msg = refusal(p)
    assert msg == (f"bad.safetensors is a damaged inversion file ({FORMAT}): {found} — save the "
                   "inversion again"), msg
    header_only = not found.startswith(("the metadata 'uncond'", "latents hold", "its contents"))
    if header_only:
        with pytest.raises(ValueError) as e:
            check_inversion_file(p)
        assert str(e.value) == msg


def test_corrupt_foreign_files_are_refused_naming_what_they_hold(tmp_path):
    """A LoRA, a checkpoint saved with transformers' {"format": "pt"}, an empty safetensors
    file: not inversion files, said with the tensors they hold."""
    lora = write(tmp_path / "lora.safetensors", {
        f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{k}.weight": torch.zeros(4, 4)
        for k in ("down", "up")} | {"lora_te_text_model.alpha": torch.ones(())},
        {"ss_network_module": "networks.lora"})
    msg = refusal(lora)
    assert msg == ("lora.safetensors is not an inversion file: its metadata has no format, "
                   "expected one of nti-inversion/1, nti-inversion/2, nti-inversion/3 (it holds "
                   "lora_te_text_model.alpha, lora_unet_down_blocks_0_attentions_0_proj_in."
                   "lora_down.weight, lora_unet_down_blocks_0_attentions_0_proj_in.lora_up."
                   "weight) — a checkpoint, LoRA or other safetensors file? Choose a file saved "
                   "by Save Inversion (NTI)"), msg
    ckpt = write(tmp_path / "ckpt.safetensors", {f"model.diffusion_model.{i}.weight":
                                                 torch.zeros(2) for i in range(6)},
                 {"format": "pt"})
    assert ("its metadata has the format 'pt', expected one of nti-inversion/1, "
            "nti-inversion/2, nti-inversion/3 (it holds model.diffusion_model.0.weight, "
            "model.diffusion_model.1.weight, model.diffusion_model.2.weight, "
            "model.diffusion_model.3.weight and 2 more)") in refusal(ckpt)
    empty = write(tmp_path / "empty.safetensors", {}, None)
    assert "its metadata has no format" in refusal(empty) and "(it holds no tensors)" in refusal(
        empty)


def test_corrupt_newer_format_is_refused_by_name(tmp_path):
    _, traj, uncond = invert()
    tensors, meta = contents(save_inversion(tmp_path / "good", traj, uncond))
    p = write(tmp_path / "future.safetensors", tensors, {**meta, "format": "nti-inversion/99"})
    assert refusal(p) == ("future.safetensors was saved by a newer version of this pack (format "
                          "nti-inversion/99; this version reads nti-inversion/1, "
                          "nti-inversion/2, nti-inversion/3): update the pack to load it")
    p = write(tmp_path / "zero.safetensors", tensors, {**meta, "format": "nti-inversion/0"})
    assert "its metadata has the format 'nti-inversion/0', expected one of" in refusal(p)


def old_file(p: Path, version: int, traj: Any, uncond: UncondEmbeddings,
             values: ValueEmbeddings | None = None) -> Path:
    """An inversion file as the writer of format ``version`` made it (git log -p --
    nti_core/files.py): 1 (944dc1e) and 2 (a14389d) the pivot, the grid and ∅ with a six-field
    report; 3 as first written (8565031) adds the maps, λ and the attention loss, and
    StyleDiffusion's values — none of them the family, precision, compute or a checksum."""
    tensors = {"latents": traj.latents, "embedding": traj.embedding,
               "fingerprint": traj.fingerprint, "grid_alphas": traj.grid.alphas,
               "grid_timesteps": torch.tensor(traj.grid.timesteps, dtype=torch.int64),
               "uncond": uncond.embeddings}
    meta = {"format": f"nti-inversion/{version}", "prompt": traj.prompt,
            "grid_kind": traj.grid.kind, "grid_alpha_end": repr(traj.grid.alpha_end)}
    report = {"method": uncond.method, "guidance": uncond.guidance,
              "final_loss": uncond.final_loss, "first_loss": uncond.first_loss,
              "iterations": uncond.iterations, "seconds": uncond.seconds}
    if version >= 3:
        report |= {"attention_weight": uncond.attention_weight,
                   "attention_loss": uncond.attention_loss}
        if traj.maps is not None:
            tensors["maps"] = traj.maps
    if values is not None:
        tensors |= {"value_shift": values.shift, "value_pivot": values.pivot,
                    "value_scale": values.scale}
        meta["values"] = json.dumps({
            "variant": values.variant, "encoder": values.encoder, "guidance": values.guidance,
            "prompt": values.prompt, "final_loss": values.final_loss,
            "first_loss": values.first_loss, "iterations": values.iterations,
            "attention_weight": values.attention_weight, "attention_loss": values.attention_loss,
            "seconds": values.seconds})
    meta["uncond"] = json.dumps(report)
    return write(p, tensors, meta)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_corrupt_or_not_each_older_format_loads(tmp_path, version):
    """Files as formats 1, 2 and the first 3 were written load whole, the fields added since
    read as their defaults, the family read from the embedding, format 1's grid named."""
    ac = scaled_linear_alphas_cumprod()
    ts = tuple(range(980, -1, -196)) if version == 1 else tuple(range(801, 0, -200))
    grid = Grid("reference", ts, ac[list(ts)], float(ac[0]))
    den, traj, uncond = invert(grid=grid)
    n = traj.num_steps
    values = None
    if version == 3:
        traj = dataclasses.replace(traj, maps=torch.rand(n, 2, 8, 4, 77))
        uncond = dataclasses.replace(uncond, attention_weight=0.5, attention_loss=[0.1] * n)
        values = ValueEmbeddings(torch.randn(n, 77, 768), torch.randn(n, 77, 768), "official",
                                 "clip-vit-base-patch16", 7.5, PROMPT, pivot_fingerprint(traj),
                                 [1e-3] * n, [1e-2] * n, [4] * n, 0.5, [0.2] * n, 2.0)
    p = old_file(tmp_path / f"v{version}.safetensors", version, traj, uncond, values)
    assert check_inversion_file(p) == f"nti-inversion/{version}"
    t2, u2, v2 = load_inversion_all(p, den.fingerprint(), family=FAMILIES["sd1"])
    assert torch.equal(t2.latents, traj.latents) and torch.equal(t2.embedding, traj.embedding)
    assert t2.prompt == PROMPT and t2.grid.timesteps == ts
    assert t2.grid.kind == (LEGACY_REFERENCE if version == 1 else "reference")
    assert torch.equal(u2.embeddings, uncond.embeddings)
    assert (u2.method, u2.final_loss, u2.iterations, u2.seconds) == (
        "null-text", [1e-4] * n, [3] * n, 1.5)
    assert (u2.precision, u2.skipped, u2.compute) == ("", 0, "")
    assert (u2.attention_weight, u2.attention_loss) == (
        (0.5, [0.1] * n) if version == 3 else (0.0, []))
    if version == 3:
        assert torch.equal(t2.maps, traj.maps) and v2 is not None
        assert torch.equal(v2.shift, values.shift) and torch.equal(v2.scale, values.scale)
        assert (v2.variant, v2.precision, v2.compute) == ("official", "", "")
    else:
        assert t2.maps is None and v2 is None


# ============================================================== the nodes (ComfyUI)


@pytest.fixture()
def nodes(comfy_root: Path, tmp_path: Path):
    """(Save Inversion, Load Inversion, run) with input/ and output/ in ``tmp_path``."""
    import folder_paths
    from test_nodes import load_pack, run

    pack = load_pack()
    found = {cls.GET_SCHEMA().node_id: cls for cls in pack.nodes.NODES}
    old = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    (tmp_path / "input" / "nti").mkdir(parents=True)
    (tmp_path / "output").mkdir()
    try:
        yield found["NTISaveInversion"], found["NTILoadInversion"], run
    finally:
        folder_paths.set_input_directory(old[0])
        folder_paths.set_output_directory(old[1])


def test_traversal_save_inversion_refuses_names_before_writing(nodes, tmp_path):
    """Each bad prefix is refused by validate_inputs (when the prompt is queued, before the
    inversion runs) and by the node, with the same message; nothing is written anywhere.
    ComfyUI's own get_save_image_path refuses only '../x' and '/etc/x' of these (0.3.64)."""
    save, _, run = nodes
    _, traj, uncond = invert()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "output" / "out").symlink_to(tmp_path / "elsewhere")
    for prefix, message in [
        ("../x", "leads outside the output folder with '..'"),
        ("nti\\..\\..\\x", "leads outside the output folder with '..'"),
        (str(tmp_path / "elsewhere" / "x"), "is an absolute path"),
        ("C:\\x", "is an absolute path"),
        ("out/x", "leads outside the output folder through a symbolic link"),
        ("nti/a\0b", "contains a control character"),
        ("nti/" + "x" * 300, "has a part of 300 bytes"),
        ("", "filename_prefix is empty"),
    ]:
        said = save.validate_inputs(filename_prefix=prefix)
        assert isinstance(said, str) and message in said, (prefix, said)
        with pytest.raises(ValueError) as e:
            run(save, trajectory=traj, uncond=uncond, filename_prefix=prefix)
        assert str(e.value) == said
    assert save.validate_inputs(filename_prefix=None) is True  # a link: checked when it runs
    assert save.validate_inputs(filename_prefix="nti/%year%/inversion") is True
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert [p.name for p in (tmp_path / "output").iterdir()] == ["out"]


def test_traversal_load_inversion_refuses_names_and_corrupt_files(nodes, tmp_path, comfy_sd15):
    """ComfyUI leaves a combo value that a node validates to the node (no "Value not in list"),
    so any string can arrive: names leaving input/ or output/ and corrupt files are refused when
    the prompt is queued, and a corrupt file again by the node, naming it."""
    save, load, run = nodes
    _, traj, uncond = invert()
    run(save, trajectory=traj, uncond=uncond, filename_prefix="nti/inversion")
    good = tmp_path / "output" / "nti" / "inversion_00001.safetensors"
    (tmp_path / "secret.safetensors").write_bytes(good.read_bytes())
    (tmp_path / "input" / "nti" / "escape.safetensors").symlink_to(tmp_path / "secret.safetensors")
    (tmp_path / "input" / "nti" / "cut.safetensors").write_bytes(good.read_bytes()[:500])
    tensors, meta = contents(good)
    write(tmp_path / "input" / "nti" / "future.safetensors", tensors,
          {**meta, "format": "nti-inversion/99"})
    options = load.INPUT_TYPES()["required"]["inversion"][1]["options"]
    assert options == ["nti/cut.safetensors", "nti/future.safetensors",
                       "nti/inversion_00001.safetensors [output]"]  # not the link leading out
    for name, message in [
        ("../secret.safetensors", "inversion '../secret.safetensors' leads outside the input "
         "folder with '..'"),
        ("nti/../../secret.safetensors [output]", "leads outside the output folder with '..'"),
        (str(tmp_path / "secret.safetensors"), "is an absolute path"),
        ("nti/escape.safetensors", "leads outside the input folder through a symbolic "
         "link"),
        ("nti/a\0.safetensors", "contains a control character"),
        ("nti/" + "x" * 300 + ".safetensors", "has a part of 312 bytes"),
        (3, "inversion must be a file name, got int"),
        ("nti/cut.safetensors", "cut.safetensors is not a readable safetensors file"),
        ("nti/future.safetensors", "future.safetensors was saved by a newer version of this "
         "pack"),
    ]:
        said = load.validate_inputs(inversion=name)
        assert isinstance(said, str) and message in said, (name, said)
    assert load.validate_inputs(inversion="nti/inversion_00001.safetensors [output]") is True
    with pytest.raises(ValueError, match="cut.safetensors is not a readable safetensors file"):
        run(load, model=comfy_sd15[0], inversion="nti/cut.safetensors")


def test_traversal_is_refused_when_comfyui_validates_the_prompt(nodes, comfy_root, tmp_path):
    """Through ComfyUI's own prompt validation (execution.validate_inputs), as a queued prompt:
    the nodes' messages reach the user before anything runs. A combo value outside the list
    reaches the node's validate_inputs (ComfyUI's "Value not in list" check is skipped for an
    input the node validates): a good file inside input/ is accepted, a bad name refused."""
    import asyncio

    import execution
    from test_nodes import REPO

    import nodes as comfy_nodes

    before = dict(comfy_nodes.NODE_CLASS_MAPPINGS), dict(comfy_nodes.EXTENSION_WEB_DIRS)
    try:
        assert asyncio.run(comfy_nodes.load_custom_node(str(REPO), module_parent="custom_nodes"))

        def errors(node: dict[str, Any]) -> list[str]:
            prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
                      "2": {"class_type": "NTILoadInversion",
                            "inputs": {"model": ["1", 0], "inversion": "x.safetensors"}},
                      "3": node}
            ok, errs, _ = asyncio.run(execution.validate_inputs(
                "p", prompt, "3", {"1": (True, [], "1"), "2": (True, [], "2")}))
            return [] if ok else [e["details"] for e in errs]

        said = errors({"class_type": "NTISaveInversion", "inputs": {
            "trajectory": ["2", 0], "uncond": ["2", 1], "filename_prefix": "../../x"}})
        assert said == ["filename_prefix - filename_prefix '../../x' leads outside the output "
                        "folder with '..': give a file name inside the output folder"], said
        _, traj, uncond = invert()
        save_inversion(tmp_path / "input" / "other" / "mine", traj, uncond)
        assert "other/mine.safetensors" not in nodes[1].INPUT_TYPES()["required"]["inversion"][1][
            "options"]
        assert errors({"class_type": "NTILoadInversion", "inputs": {
            "model": ["1", 0], "inversion": "other/mine.safetensors"}}) == []
        said = errors({"class_type": "NTILoadInversion", "inputs": {
            "model": ["1", 0], "inversion": "/etc/passwd.safetensors"}})
        assert said == ["inversion - inversion '/etc/passwd.safetensors' is an absolute path: "
                        "give a file name inside the input folder"], said
    finally:
        for key in set(comfy_nodes.NODE_CLASS_MAPPINGS) - set(before[0]):
            comfy_nodes.NODE_CLASS_MAPPINGS.pop(key)
        comfy_nodes.EXTENSION_WEB_DIRS.clear()
        comfy_nodes.EXTENSION_WEB_DIRS.update(before[1])
