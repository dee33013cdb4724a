"""NTISaveInversion: write the pivot and ∅ to <output>/<prefix>_00001.safetensors."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..nti_core.files import confined, save_numbered
from ..nti_core.trajectory import Trajectory, UncondEmbeddings, ValueEmbeddings
from . import types
from .common import CATEGORY, queue_check

log = logging.getLogger(__name__)

OUTPUT = "the output folder"


def check_prefix(filename_prefix: str) -> None:
    """Refuse a prefix that leaves the output folder ('..', an absolute path, a symbolic link
    leading out), holds a control character or a name too long for a filesystem."""
    confined(folder_paths.get_output_directory(), filename_prefix, "filename_prefix", OUTPUT)


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
    def validate_inputs(cls, filename_prefix: str | None = None) -> bool | str:
        """Refuse a bad prefix when the prompt is queued, before the inversion runs (None: a
        link, checked when the node runs)."""
        return queue_check(check_prefix, filename_prefix)

    @classmethod
    def execute(cls, trajectory: Trajectory, uncond: UncondEmbeddings,
                filename_prefix: str, values: ValueEmbeddings | None = None) -> io.NodeOutput:
        check_prefix(filename_prefix)
        output_dir = folder_paths.get_output_directory()
        folder, name, _, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir)  # refuses paths outside the output folder too
        path = save_numbered(folder, name, trajectory, uncond, values)
        log.info("[NTI] saved the inversion to %s", path)
        relative = os.path.relpath(path, output_dir).replace(os.sep, "/")
        ui = {"text": [relative],
              "nti_inversion": [{"filename": path.name, "subfolder": subfolder,
                                 "type": "output"}]}
        return io.NodeOutput(ui=ui)
