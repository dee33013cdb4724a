"""The ComfyUI host in half precision, its backward's memory and its model management.

Models are built from ComfyUI's own classes with their weights *and compute* in bf16 / fp16 (no
manual cast: what ComfyUI does on a GPU; on the CPU it would cast half weights up to fp32), under
``torch.inference_mode()`` as ComfyUI's loaders build them. Needs $COMFYUI_PATH.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from core_support import cat_latent
from test_comfy_families import KINDS, PROMPT, comfy_model, embedding

from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize
from nti_core.memory import backward_bytes, weight_copy_bytes
from nti_core.null_text import UNCOND_ROW
from nti_core.sampling import p2p_sample

STEPS = 4


@pytest.fixture(scope="module")
def z0() -> torch.Tensor:
    return cat_latent(64)


def run(model: Any, z0: torch.Tensor, precision: str = "model", **grad_kwargs):
    """Invert, null-text-fast at ``precision``, reconstruct: (sampling denoiser, optimisation
    denoiser, ∅, reconstruction)."""
    from nti_core.hosts.comfy import ComfyDenoiser, autograd

    den = ComfyDenoiser(model)
    cond, null = embedding(den.family, 1), embedding(den.family, 2)
    traj = ddim_invert(den, z0, cond, make_grid(den.alphas_cumprod, STEPS), PROMPT)
    with autograd():
        opt = ComfyDenoiser(model, for_grad=True, precision=precision, **grad_kwargs)
        uncond = null_text_optimize(opt, traj, null, NullTextOptions(fast=True),
                                    precision=opt.precision)
    run.traj = traj  # for tests that sample again
    return den, opt, uncond, p2p_sample(den, traj, uncond, traj.embedding)


@pytest.mark.parametrize("kind", ["sd1-eps", "sdxl-eps"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_models_invert_optimise_and_sample_in_half(comfy_root, z0, kind, half) -> None:
    """The attention hooks see half-precision queries in every stage, ∅ stays fp32, and the
    reconstruction stays near the same weights' all-fp32 error — measured (printed for the
    README): bf16 1.51× (SD 1.x) and 0.99× (SDXL), fp16 1.01× and 1.06×; bounded at 2× for bf16
    (whose sampling alone costs up to 3.3× on the demo model, docs/precision.md), 1.5× for fp16."""
    family, prediction, zsnr = KINDS[kind]
    errors = {}
    for dtype in (torch.float32, half):
        model = comfy_model(family, prediction, zsnr, seed=3, dtype=dtype, inference=True)
        den, opt, uncond, rec = run(model, z0)
        assert den.dtype == dtype and opt.dtype == dtype
        assert den.attention_dtypes == {dtype} and opt.attention_dtypes == {dtype}
        assert uncond.embeddings.dtype == torch.float32
        assert ("dynamic loss scaling" in uncond.precision) == (dtype == torch.float16)
        errors[dtype] = float(F.mse_loss(rec, z0))
    print(f"{kind} {half}: reconstruction latent MSE fp32 {errors[torch.float32]:.3e}, "
          f"half {errors[half]:.3e}")
    assert errors[half] <= (2.0 if half == torch.bfloat16 else 1.5) * errors[torch.float32], \
        errors


def saved_split(den, z0: torch.Tensor, null: torch.Tensor) -> tuple[int, int, int]:
    """One ∅ pass with grad: bytes the backward keeps in storages of the UNet's weights (views
    of them), in others, and the UNet's weight bytes."""
    from nti_core.hosts.comfy import autograd

    unet = den.patcher.model.diffusion_model
    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    kept = {"weights": 0, "other": 0}
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            kept["weights" if ptr in weights else "other"] += t.untyped_storage().nbytes()
        return t

    with autograd():
        u = null.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            den.eps(z0, 500, u, rows=UNCOND_ROW, step=0)
    size = sum(p.numel() * p.element_size() for p in unet.parameters())
    return kept["weights"], kept["other"], size


def test_the_backward_keeps_views_of_half_weights_and_copies_only_for_fp32(comfy_root, z0):
    """precision 'model': what autograd keeps of the weights are the loaded weights themselves
    (no copy); precision 'fp32' on a bf16 model: ComfyUI's per-call fp32 copies, twice the
    weights' bytes on top."""
    from nti_core.hosts.comfy import ComfyDenoiser

    family = KINDS["sd1-eps"][0]
    model = comfy_model(family, seed=3, dtype=torch.bfloat16, inference=True)
    null = embedding(family, 2)
    own, other_own, size = saved_split(ComfyDenoiser(model, for_grad=True, precision="model"),
                                       z0, null)
    cast, other_cast, _ = saved_split(ComfyDenoiser(model, for_grad=True, precision="fp32"),
                                      z0, null)
    assert own > 0.5 * size  # the weights a backward needs, kept as themselves
    assert cast == 0  # fp32 compute: nothing of the bf16 weights, copies instead
    assert other_cast - other_own > 0.5 * 2 * size  # fp32 copies: 4 bytes for each bf16 pair


def test_checkpointing_gives_the_same_uncond_and_the_model_is_restored_after(comfy_root, z0):
    """Gradient checkpointing of every ResBlock and transformer block: the same ∅ and attention
    loss (the recomputed attention finds its site and step), less kept for the backward; when
    the MODEL itself loads next, ComfyUI has put its own layers and weights back."""
    import comfy.model_management as mm

    from nti_core.hosts.comfy import ComfyDenoiser, WeightAlias, autograd, transformer_keys

    family = KINDS["sd1-eps"][0]
    model = comfy_model(family, seed=3, inference=True)
    unet = model.model.diffusion_model
    layers = {n: m for n, m in unet.named_modules()}
    den = ComfyDenoiser(model)
    cond, null = embedding(family, 1), embedding(family, 2)
    traj = ddim_invert(den, z0, cond, make_grid(den.alphas_cumprod, 3), PROMPT, record_maps=True)
    runs, kept = {}, {}
    for ckpt in (False, True):
        with autograd():
            opt = ComfyDenoiser(model, for_grad=True, checkpointing=ckpt)
            runs[ckpt] = null_text_optimize(opt, traj, null,
                                            NullTextOptions(inner_steps=3, attention_weight=1.0))
        kept[ckpt] = saved_split(opt, z0, null)[1]
        assert opt.checkpointing == ckpt
    assert torch.equal(runs[True].embeddings, runs[False].embeddings)
    assert runs[True].attention_loss == runs[False].attention_loss
    assert kept[True] < 0.6 * kept[False], kept

    mm.load_models_gpu([model])
    assert {n: m for n, m in unet.named_modules()} == layers  # the same module objects
    assert all(not any(isinstance(f, WeightAlias) for f in getattr(m, "weight_function", []))
               for m in unet.modules())
    assert model.model.manual_cast_dtype is None
    assert len(transformer_keys(model)) == len(transformer_keys(den.patcher))


def test_the_load_asks_comfyui_for_the_memory_of_the_backward(comfy_root, z0, monkeypatch):
    import comfy.model_management as mm

    from nti_core.hosts.comfy import ComfyDenoiser

    asked = []
    real = mm.load_models_gpu

    def spy(models, memory_required=0, **kw):
        asked.append(memory_required)
        return real(models, memory_required=memory_required, **kw)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    model = comfy_model(KINDS["sdxl-eps"][0], seed=3, dtype=torch.bfloat16, inference=True)
    opt = ComfyDenoiser(model, for_grad=True, latent_hw=(128, 128), precision="model")
    assert asked and asked[-1] == backward_bytes("sdxl", (128, 128), torch.bfloat16) > 4e9
    assert not opt.checkpointing  # the CPU: its memory is the system's
    auto = ComfyDenoiser(model, for_grad=True, latent_hw=(128, 128))  # bf16 optimises in fp32
    unet = auto.patcher.model.diffusion_model
    assert asked[-1] == (backward_bytes("sdxl", (128, 128), torch.float32)  # with fp32 copies
                         + weight_copy_bytes(unet, torch.float32)) > 2 * asked[-2]
    forced = ComfyDenoiser(model, for_grad=True, latent_hw=(128, 128), checkpointing=True,
                           precision="model")
    assert forced.checkpointing
    assert forced.memory_required == backward_bytes("sdxl", (128, 128), torch.bfloat16, True)
    assert "gradient checkpointing on" in forced.describe()


def test_a_partially_loaded_model_differentiates_like_a_loaded_one(comfy_root, z0) -> None:
    """Low-VRAM loading leaves layers offloaded and applies their weight patches (a LoRA) per
    call; the optimisation's wrappers then hand autograd ComfyUI's patched copies, so ε and the
    gradient of ∅ equal those of the fully loaded model."""
    from nti_core.hosts.comfy import ComfyDenoiser, autograd

    family = KINDS["sd1-eps"][0]
    model = comfy_model(family, seed=3, inference=True).clone()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weight = model.model.diffusion_model.get_parameter(key.removeprefix("diffusion_model."))
    model.add_patches({key: (torch.full_like(weight, 0.01),)}, 1.0)  # a "diff" patch
    null = embedding(family, 2)
    grads = {}
    for partial in (False, True):
        den = ComfyDenoiser(model, for_grad=True)
        den.load()
        if partial:
            den.patcher.unpatch_model()
            den.patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
            assert den.patcher.model.model_lowvram
            den.load = lambda: None  # keep this loading
        with autograd():
            u = null.clone().requires_grad_(True)
            eps = den.eps(z0, 500, u, rows=UNCOND_ROW, step=0)
            eps.square().mean().backward()
        grads[partial] = (eps.detach(), u.grad)
        den.patcher.unpatch_model()
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[True][1], grads[False][1], rtol=1e-4, atol=1e-9)


def test_sampling_follows_the_dtype_the_uncond_was_optimised_in(comfy_root, z0) -> None:
    """precision fp32 on a bf16 model: the optimisation and the sampling with its ∅ compute in
    fp32 (P2P Sample builds its denoiser with ``sampling_dtype``); precision model: both bf16."""
    from nti_core.hosts.comfy import ComfyDenoiser, model_compute_dtype
    from nti_core.precision import sampling_dtype

    family = KINDS["sd1-eps"][0]
    model = comfy_model(family, seed=3, dtype=torch.bfloat16, inference=True)
    for precision, expected in (("fp32", torch.float32), ("model", torch.bfloat16)):
        _, opt, uncond, _ = run(model, z0, precision)
        assert uncond.compute == str(expected).removeprefix("torch.")
        dtype = sampling_dtype(model_compute_dtype(model), uncond.compute)
        den = ComfyDenoiser(model, compute=dtype)
        p2p_sample(den, run.traj, uncond, run.traj.embedding)
        assert den.dtype == expected and den.attention_dtypes == {expected}
        assert opt.attention_dtypes == {expected}
    assert model.model.manual_cast_dtype is None  # the MODEL itself still computes in bf16
