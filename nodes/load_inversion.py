"""NTILoadInversion: read a saved inversion; refuses one made with another model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..nti_core.files import check_inversion_file, confined, inside, load_inversion_all
from . import types
from .common import CATEGORY, make_denoiser, queue_check

SUFFIX = ".safetensors"
SUBFOLDER = "nti"  # where Save Inversion (NTI) writes by default, under output/ and input/
OUTPUT_MARK = " [output]"  # ComfyUI's annotation: a name under the output folder


def _files(root: str, recursive: bool) -> list[str]:
    """.safetensors files under ``root`` (relative, '/'-separated), none that a symbolic link
    takes out of it."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = base.rglob(f"*{SUFFIX}") if recursive else base.glob(f"*{SUFFIX}")
    return sorted(p.relative_to(base).as_posix() for p in found
                  if p.is_file() and inside(base, p))


def inversion_files() -> list[str]:
    """input/*.safetensors, input/nti/**, and output/nti/** annotated ' [output]'."""
    inputs = folder_paths.get_input_directory()
    names = _files(inputs, False)
    names += [f"{SUBFOLDER}/{n}" for n in _files(os.path.join(inputs, SUBFOLDER), True)]
    outputs = os.path.join(folder_paths.get_output_directory(), SUBFOLDER)
    names += [f"{SUBFOLDER}/{n} [output]" for n in _files(outputs, True)]
    return names


def resolve(inversion: str) -> str:
    """The file a combo value names (``name`` under input/, ``name [output]`` under output/);
    refuses a name that leaves its folder (ComfyUI checks no combo value a node validates)."""
    output = isinstance(inversion, str) and inversion.endswith(OUTPUT_MARK)
    name = inversion.removesuffix(OUTPUT_MARK) if output else inversion
    root, where = ((folder_paths.get_output_directory(), "the output folder") if output
                   else (folder_paths.get_input_directory(), "the input folder"))
    path = confined(root, name, "inversion", where)
    if not name.endswith(SUFFIX):
        raise ValueError(f"not a .safetensors inversion file: {inversion!r}")
    if not path.is_file():
        raise ValueError(f"no inversion file {inversion!r} in {where}: save one with Save "
                         "Inversion (NTI), or refresh the node's list")
    return str(path)


class NTILoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NTILoadInversion",
            display_name="Load Inversion (NTI)",
            category=CATEGORY,
            description="Load an inversion saved by Save Inversion (NTI): pivot trajectory and "
            "∅, checked against the connected model. Shows the prompt, the grid and the ∅ "
            "report on the node.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL to edit with; must be the one the "
                               "inversion was made with."),
                io.Combo.Input("inversion", options=inversion_files(),
                               tooltip="A .safetensors inversion from the input folder (input/, "
                               "input/nti/) or from output/nti/ (marked [output])."),
            ],
            outputs=[
                types.Trajectory.Output("trajectory", display_name="trajectory",
                                        tooltip="The saved pivot."),
                types.Uncond.Output("uncond", display_name="uncond", tooltip="The saved ∅."),
                types.Values.Output("values", display_name="values",
                                    tooltip="StyleDiffusion's value embeddings when the file "
                                    "holds them (else nothing: leave P2P Sample's values "
                                    "unconnected)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, inversion: str | None = None) -> bool | str:
        """Refuse a bad name or file (read from its header) when the prompt is queued (None: a
        link, checked when the node runs)."""
        return queue_check(lambda name: check_inversion_file(resolve(name)), inversion)

    @classmethod
    def fingerprint_inputs(cls, inversion: str, **kwargs) -> str:
        """Re-run when the file's content changes."""
        digest = hashlib.sha256()
        with open(resolve(inversion), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @classmethod
    def execute(cls, model, inversion: str) -> io.NodeOutput:
        path = resolve(inversion)
        den = make_denoiser(model)
        traj, uncond, values = load_inversion_all(path, fingerprint=den.fingerprint(),
                                                  family=den.family)
        if uncond is None:
            raise ValueError(f"{inversion} holds a trajectory but no ∅: run Null-Text Optimize "
                             "(NTI) on it")
        summary = (f"source prompt: {traj.prompt}\ngrid {traj.grid.describe()}\n"
                   f"latent {traj.latents.shape[-2]}x{traj.latents.shape[-1]}\n"
                   f"attention maps: {'yes' if traj.maps is not None else 'no'}\n"
                   f"{uncond.report()}")
        if values is not None:
            summary += "\n" + values.report().splitlines()[0]
        return io.NodeOutput(traj, uncond, values, ui=ui.PreviewText(summary))
