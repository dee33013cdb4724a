"""Test-only ComfyUI custom node: ComfyUI on the CPU computes half-precision weights in
half precision, as it does on a GPU.

ComfyUI decides at load time whether a bf16 / fp16 model computes in its own dtype or is cast to
fp32 per layer (``comfy.model_management.unet_manual_cast``, and the text encoder's and VAE's
dtypes), by asking ``should_use_fp16`` / ``should_use_bf16`` about the device; on a CPU they
answer no. The half-precision HTTP tests start ComfyUI with ``--bf16-unet`` / ``--fp16-unet`` and
this folder in ``custom_nodes/``, which makes both answer yes before any model loads. Never
shipped: it lives under tests/ and is linked into throwaway test servers only.
"""

import comfy.model_management as mm


def _yes(*args, **kwargs):
    return True


mm.should_use_fp16 = _yes
mm.should_use_bf16 = _yes

NODE_CLASS_MAPPINGS: dict = {}
