"""NTISaveInversion: write the pivot and ∅ to <output>/<prefix>_00001.safetensors."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..nti_core.files import save_inversion
from ..nti_core.trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings
from . import types
from .common import CATEGORY

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


def next_path(folder: str, name: str) -> Path:
    """``<folder>/<name>_NNNNN.safetensors`` with NNNNN one past the highest already there."""
    pattern = re.compile(rf"{re.escape(name)}_(\d+){re.escape(SUFFIX)}$", re.IGNORECASE)
    numbers = [int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))]
    return Path(folder) / f"{name}_{max(numbers, default=0) + 1:05d}{SUFFIX}"


class NTISaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NTISaveInversion",
            display_name="Save Inversion (NTI)",
            category=CATEGORY,
            description="Save the inversion (pivot trajectory and ∅) to ComfyUI's output folder, "
            "to edit the same photo later without inverting it again. Move the file into the "
            "input folder (or input/nti/) to share it; Load Inversion (NTI) also lists output/nti/.",
            is_output_node=True,
            inputs=[
                types.Trajectory.Input("trajectory", tooltip="The pivot to save."),
                types.Uncond.Input("uncond", tooltip="The ∅ optimised on that pivot."),
                io.String.Input("filename_prefix", default="nti/inversion",
                                tooltip="Path under the output folder; '_00001.safetensors' and "
                                "so on is appended."),
                types.Values.Input("values", optional=True,
                                   tooltip="StyleDiffusion's value embeddings of that pivot, "
                                   "saved with it."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, trajectory: Trajectory, uncond: UncondEmbeddings,
                filename_prefix: str, values: ValueEmbeddings | None = None) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        folder, name, _, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir)  # refuses paths outside the output folder
        os.makedirs(folder, exist_ok=True)
        path = save_inversion(next_path(folder, name), trajectory, uncond, values)
        log.info("[NTI] saved the inversion to %s", path)
        relative = os.path.relpath(path, output_dir).replace(os.sep, "/")
        ui = {"text": [relative],
              "nti_inversion": [{"filename": path.name, "subfolder": subfolder,
                                 "type": "output"}]}
        return io.NodeOutput(ui=ui)
