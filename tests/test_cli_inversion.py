"""The command line's inversion files (``--save-inversion`` / ``--load-inversion``): the format
and checks of Save / Load Inversion (NTI), an existing file never replaced, a loaded inversion
refused before the model loads when it cannot be this edit's; and a model folder whose weights
are pickles only is refused (nothing is unpickled)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from core_support import CAT, CAT_PROMPT, ROOT

import nti_core.app.edit as cli
from nti_core.app import main
from nti_core.files import FORMAT, check_inversion_file, load_inversion_all

DOG = "a dog sitting next to a mirror"


def argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["edit", "--model", str(model), "--image", str(CAT), "--source", CAT_PROMPT,
            "--target", DOG, "--steps", "3", "--inner-steps", "2", "--size", "64",
            "--no-attention-maps", "--out", str(out), *extra]


def error(capsys: pytest.CaptureFixture[str], args: list[str], loaded: bool = False) -> str:
    """The error of a run that must stop (exit status 2): all it prints, unless the model
    ``loaded`` first (then its last line, after diffusers' progress bar)."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and (loaded or last == err), err
    return last.removeprefix("error: ")


@pytest.fixture(scope="module")
def saved(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One edit that inverts and saves its inversion (file name given without the suffix)."""
    root = tmp_path_factory.mktemp("cli_inversion")
    latents: list[torch.Tensor] = []
    real = cli.edit
    cli.edit = lambda *a, **k: latents.append(real(*a, **k)) or latents[-1]  # type: ignore[assignment]
    try:
        assert main(argv(tiny_ckpt, root / "first", "--save-inversion",
                         str(root / "inv" / "cat"))) == 0
    finally:
        cli.edit = real  # type: ignore[assignment]
    return {"file": root / "inv" / "cat.safetensors", "latents": latents[0],
            "report": json.loads((root / "first" / "report.json").read_text())}


def test_cli_saves_the_nodes_format_and_a_loaded_inversion_edits_the_same(
        saved: dict[str, Any], tiny_ckpt: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    f = saved["file"]
    assert check_inversion_file(f) == FORMAT  # what Load Inversion (NTI) reads
    traj, uncond, _ = load_inversion_all(f)
    assert uncond is not None and traj.prompt == CAT_PROMPT and traj.num_steps == 3
    assert saved["report"]["inversion_file"] == {"loaded": None, "saved": str(f)}
    assert traj.latents.shape[-2:] == (8, 6)  # the 3:4 photo at 64 px: 48×64
    seen: list[torch.Tensor] = []
    real = cli.edit
    monkeypatch.setattr(cli, "edit", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    # the loaded run takes the file's 3 steps whatever --steps says, and optimises nothing
    args = argv(tiny_ckpt, tmp_path / "again", "--load-inversion", str(f))
    args[args.index("--steps") + 1] = "50"
    assert main(args) == 0
    assert torch.equal(seen[0], saved["latents"])  # reconstruction and edit, bit for bit
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["timings"] == {} and report["uncond"] == saved["report"]["uncond"]
    assert report["reconstruction"] == saved["report"]["reconstruction"]


def test_cli_never_overwrites_an_inversion_file(saved: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything loads (the model path does not even exist), the file untouched;
    given with or without its suffix."""
    f = saved["file"]
    before = f.read_bytes()
    for name in (f, f.with_suffix("")):
        err = error(capsys, argv(tmp_path / "nowhere", tmp_path / "o", "--save-inversion",
                                 str(name)))
        assert err == (f"{f} exists: inversion files are never overwritten — give another name, "
                       "or move that file away")
    assert f.read_bytes() == before


def test_cli_refuses_a_corrupt_or_unfitting_inversion_before_the_model_loads(
        saved: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each refusal comes before --model is read (it does not exist here)."""
    f = saved["file"]
    nowhere = tmp_path / "nowhere"

    def load_error(path: Path, *extra: str) -> str:
        return error(capsys, argv(nowhere, tmp_path / "o", "--load-inversion", str(path), *extra))

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:100])
    assert load_error(cut).startswith("cut.safetensors is not a readable safetensors file")
    assert load_error(tmp_path / "gone.safetensors") == f"no inversion file at {tmp_path / 'gone.safetensors'}"
    args = argv(nowhere, tmp_path / "o", "--load-inversion", str(f))
    args[args.index("--source") + 1] = "a cat"
    args[args.index("--target") + 1] = "a dog"
    assert error(capsys, args) == ("cat.safetensors was inverted with the source prompt "
                                   f"'{CAT_PROMPT}', not 'a cat': give that prompt as --source")
    assert load_error(f, "--crop") == ("cat.safetensors is the inversion of a 48×64 px image, but "
                                 "--image at --size 64 gives 64×64 px: give the photo, --size "
                                 "and --crop it was inverted with")


def test_cli_refuses_an_inversion_of_other_weights(saved: dict[str, Any], tiny_ckpt: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The model's fingerprint is checked as Load Inversion (NTI) checks it: one UNet weight
    changed in the checkpoint makes it another model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_ckpt), "pt") as ckpt:
        weights = {k: ckpt.get_tensor(k) for k in ckpt.keys()}  # noqa: SIM118
        meta = ckpt.metadata()
    key = next(k for k in weights if k.startswith("model.diffusion_model.out."))
    weights[key] = weights[key] + 0.01
    other = tmp_path / "other.safetensors"
    save_file(weights, str(other), metadata=meta)
    assert error(capsys, argv(other, tmp_path / "o", "--load-inversion", str(saved["file"])),
                 loaded=True) == (
        "cat.safetensors was made with a different model than the one connected: invert the "
        "image again with this model, or connect the model it was made with")


def test_a_folder_of_pickled_weights_is_refused_unread(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A diffusers folder whose UNet is a .bin (here not even a pickle: it is never opened)."""
    from tiny_models import save_pipeline, tiny_sd1

    folder = save_pipeline(tiny_sd1(), tmp_path / "sd1")
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    err = error(capsys, argv(folder, tmp_path / "o"))
    assert err.startswith("sd1/unet has no .safetensors weights (found "
                          "['diffusion_pytorch_model.bin']): pickled weights (.bin, .pt) are "
                          "not loaded")


def test_every_weight_loader_passes_use_safetensors() -> None:
    """Each ``from_pretrained`` of weights in the engine refuses pickles itself (tokenizers read
    JSON and text)."""
    calls = []
    for f in sorted((ROOT / "nti_core").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"
                    and not ast.unparse(node.func.value).endswith("Tokenizer")):
                words = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((f.name, node.lineno, words.get("use_safetensors")))
    assert len(calls) >= 3, calls  # the SD and SDXL pipelines, the image encoder
    assert all(flag == "True" for *_, flag in calls), calls
