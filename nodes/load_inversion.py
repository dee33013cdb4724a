"""NTILoadInversion: read a saved inversion; refuses one made with another model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..nti_core.files import load_inversion_all
from . import types
from .common import CATEGORY, make_denoiser

SUFFIX = ".safetensors"
SUBFOLDER = "nti"  # where Save Inversion (NTI) writes by default, under output/ and input/


def _files(root: str, recursive: bool) -> list[str]:
    """.safetensors files under ``root`` (relative, '/'-separated)."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = base.rglob(f"*{SUFFIX}") if recursive else base.glob(f"*{SUFFIX}")
    return sorted(p.relative_to(base).as_posix() for p in found if p.is_file())


def inversion_files() -> list[str]:
    """input/*.safetensors, input/nti/**, and output/nti/** annotated ' [output]'."""
    inputs = folder_paths.get_input_directory()
    names = _files(inputs, False)
    names += [f"{SUBFOLDER}/{n}" for n in _files(os.path.join(inputs, SUBFOLDER), True)]
    outputs = os.path.join(folder_paths.get_output_directory(), SUBFOLDER)
    names += [f"{SUBFOLDER}/{n} [output]" for n in _files(outputs, True)]
    return names


def resolve(inversion: str) -> str:
    """The file a combo value names; refuses names that leave the input/output folders."""
    if not (inversion.endswith(SUFFIX) or inversion.endswith(f"{SUFFIX} [output]")):
        raise ValueError(f"not a .safetensors inversion file: {inversion!r}")
    path = os.path.abspath(folder_paths.get_annotated_filepath(inversion))
    roots = [os.path.abspath(folder_paths.get_input_directory()),
             os.path.abspath(folder_paths.get_output_directory())]
    if not any(os.path.commonpath([root, path]) == root for root in roots):
        raise ValueError(f"{inversion!r} is outside ComfyUI's input and output folders")
    if not os.path.isfile(path):
        raise ValueError(f"no inversion file {inversion!r} in ComfyUI's input (or output) folder")
    return path


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
    def validate_inputs(cls, inversion: str) -> bool | str:
        try:
            resolve(inversion)
        except ValueError as e:
            return str(e)
        return True

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
