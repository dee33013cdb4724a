"""The ComfyUI host (nti_core.hosts.comfy) against a real ComfyUI checkout and a diffusers reference.

Needs $COMFYUI_PATH (skipped, saying so, without it), except the pure row/chunk helpers at the top.
The model is the generated tiny SD1.5 checkpoint (tests/comfy_support.py): transformer blocks at
input 1 and output 2, 3 (full latent resolution) and middle 0 (half resolution).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import comfy_support
import pytest
import torch
from torch import Tensor

from nti_core.denoiser import Rows, Site, model_fingerprint, same_model, sdpa
from nti_core.hosts.comfy import (
    ComfyDenoiser,
    autograd,
    check_interrupt,
    chunks_of_rows,
    patch_model,
    plan_calls,
    rows_from_chunks,
)
from nti_core.schedule import make_grid, scaled_linear_alphas_cumprod

REPO = Path(__file__).resolve().parents[1]
H, W = 16, 24  # non-square, so a swapped (h, w) shows


class Recorder:
    """A controller that records what the host tells it and returns plain attention."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, heads: int, site: Site, hw: tuple[int, int],
        step: int, rows: Rows,
    ) -> Tensor:
        self.calls.append({
            "site": site, "hw": hw, "step": step, "heads": heads, "tokens": q.shape[1],
            "branch": rows.branch.tolist(), "slot": rows.slot.tolist(), "batch": q.shape[0],
        })
        return sdpa(q, k, v, heads)

    def after_step(self, step: int, latents: Tensor) -> Tensor:
        return latents


def inputs(batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """z [B, 4, H, W] and context [B, 77, 768]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, H, W, generator=g), torch.randn(batch, 77, 768, generator=g)


# ============================================================== pure helpers (no ComfyUI needed)


def test_rows_from_chunks_follow_cond_or_uncond_not_halves() -> None:
    rows = rows_from_chunks([1, 0], 4, "cpu")
    assert rows.branch.tolist() == [False, False, True, True]
    assert rows.slot.tolist() == [0, 1, 0, 1]
    rows = rows_from_chunks([0, 1], 2, "cpu")  # cond first: labels follow the list
    assert rows.branch.tolist() == [True, False] and rows.slot.tolist() == [0, 0]
    with pytest.raises(RuntimeError):
        rows_from_chunks([1, 0], 3, "cpu")


def test_rows_are_planned_as_comfy_chunks() -> None:
    assert chunks_of_rows(Rows.cfg(2)) == [(0, 2, 1), (2, 2, 0)]
    assert plan_calls(Rows.cfg(2)) == [(0, 4, [1, 0])]
    assert plan_calls(Rows.cfg(2), separate=True) == [(0, 2, [1]), (2, 4, [0])]
    uneven = Rows.make([False, True, True], [0, 0, 1])
    assert plan_calls(uneven) == [(0, 1, [1]), (1, 3, [0])]
    with pytest.raises(ValueError, match="slot"):
        chunks_of_rows(Rows.make([True], [1]))


def test_nti_core_imports_without_comfy() -> None:
    code = (
        "import sys, nti_core, nti_core.hosts.comfy; "
        "bad = [m for m in sys.modules if m == 'comfy' or m.startswith('comfy.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ============================================================== the checkpoint


def test_tiny_checkpoint_loads_as_sd15(
    comfy_sd15: Any, tiny_checkpoint: Path, tiny_spec: comfy_support.TinySpec
) -> None:
    import comfy.model_base
    import comfy.supported_models

    model, clip, vae = comfy_sd15
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    config = model.model.model_config.unet_config
    for key, value in tiny_spec.comfy_unet_config().items():
        if key not in ("image_size", "use_checkpoint"):
            assert config[key] == value, key
    assert tiny_checkpoint.stat().st_size < 340 * 2**20
    cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    image = vae.decode(torch.randn(1, 4, 8, 8))
    assert image.shape[-3:] == (64, 64, 3) and torch.isfinite(image).all()


def test_checkpoint_is_deterministic(tiny_checkpoint: Path, tiny_spec: comfy_support.TinySpec):
    from safetensors import safe_open

    again = comfy_support.build_state_dict(tiny_spec, comfy_support.DEFAULT_SEED, parts=("unet",))
    with safe_open(str(tiny_checkpoint), "pt") as f:
        for key in list(again)[:: max(1, len(again) // 20)]:
            assert torch.equal(f.get_tensor(key), again[key]), key


def test_install_into_models_folder(install_tiny_checkpoint: Any, tmp_path: Path) -> None:
    path = install_tiny_checkpoint(tmp_path / "models", "tiny.safetensors")
    assert path == tmp_path / "models" / "checkpoints" / "tiny.safetensors" and path.is_file()


# ============================================================== ε


def test_alphas_cumprod_match_sd1_schedule(comfy_sd15: Any) -> None:
    alphas = ComfyDenoiser(comfy_sd15[0]).alphas_cumprod
    assert alphas.dtype == torch.float64 and alphas.shape == (1000,)
    torch.testing.assert_close(alphas, scaled_linear_alphas_cumprod(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["reference", "ddim_uniform"])
def test_eps_matches_diffusers_unet(comfy_sd15: Any, tiny_diffusers_unet: Any, kind: str) -> None:
    den = ComfyDenoiser(comfy_sd15[0])
    grid = make_grid(den.alphas_cumprod, 50, kind)  # type: ignore[arg-type]
    z, ctx = inputs(2)
    for t in (grid.timesteps[0], grid.timesteps[25], grid.timesteps[-1]):
        ours = den.eps(z, t, ctx)
        with torch.no_grad():
            ref = tiny_diffusers_unet(z, t, encoder_hidden_states=ctx).sample
        assert ours.shape == z.shape and ours.dtype == z.dtype
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0, msg=f"t = {t}")


def test_hooks_see_every_transformer_block(
    comfy_sd15: Any, tiny_spec: comfy_support.TinySpec
) -> None:
    model = comfy_sd15[0]
    den = ComfyDenoiser(model)
    rec = Recorder()
    z, ctx = inputs(1)
    den.eps(z, 500, ctx, step=7, controller=rec)
    sites = [c["site"] for c in rec.calls]
    assert len(sites) == len(set(sites)) == 2 * tiny_spec.transformer_blocks() == len(den.sites)
    assert set(sites) == set(den.sites)
    assert {(s.block, s.index, s.depth) for s in sites} == {
        ("input", 1, 0), ("middle", 0, 0), ("output", 2, 0), ("output", 3, 0)
    }
    for c in rec.calls:
        assert c["step"] == 7 and c["heads"] == 8
        assert c["hw"] == ((H // 2, W // 2) if c["site"].block == "middle" else (H, W))
        assert c["hw"][0] * c["hw"][1] == c["tokens"]


def test_rows_labelled_for_cond_and_uncond(comfy_sd15: Any) -> None:
    z, ctx = inputs(4)
    for separate in (False, True):
        rec = Recorder()
        ComfyDenoiser(comfy_sd15[0], separate_calls=separate).eps(
            z, 300, ctx, rows=Rows.cfg(2), step=3, controller=rec
        )
        seen = {(tuple(c["branch"]), tuple(c["slot"])) for c in rec.calls}
        if separate:
            assert seen == {((False, False), (0, 1)), ((True, True), (0, 1))}
        else:
            assert seen == {((False, False, True, True), (0, 1, 0, 1))}
    rec = Recorder()
    ComfyDenoiser(comfy_sd15[0]).eps(z[:3], 300, ctx[:3], step=0, controller=rec)
    assert {(tuple(c["branch"]), tuple(c["slot"])) for c in rec.calls} == {
        ((True, True, True), (0, 1, 2))
    }


def test_one_call_equals_two_calls(comfy_sd15: Any) -> None:
    z, ctx = inputs(4, seed=1)
    rows = Rows.cfg(2)
    joint = ComfyDenoiser(comfy_sd15[0]).eps(z, 700, ctx, rows=rows)
    split = ComfyDenoiser(comfy_sd15[0], separate_calls=True).eps(z, 700, ctx, rows=rows)
    torch.testing.assert_close(joint, split, atol=1e-5, rtol=0)
    uneven = Rows.make([False, True, True], [0, 0, 1])
    torch.testing.assert_close(
        ComfyDenoiser(comfy_sd15[0]).eps(z[:3], 700, ctx[:3], rows=uneven),
        joint[:3], atol=1e-5, rtol=0,  # without a controller labels do not change ε
    )


def test_plain_controller_equals_no_controller(comfy_sd15: Any) -> None:
    den = ComfyDenoiser(comfy_sd15[0])
    z, ctx = inputs(2, seed=2)
    plain = den.eps(z, 400, ctx, rows=Rows.cfg(1))
    hooked = den.eps(z, 400, ctx, rows=Rows.cfg(1), step=0, controller=Recorder())
    torch.testing.assert_close(plain, hooked, atol=1e-5, rtol=0)


def test_unet_function_wrapper_is_honoured(comfy_sd15: Any) -> None:
    seen: list[list[int]] = []

    def wrapper(apply_model: Any, args: dict[str, Any]) -> Tensor:
        seen.append(list(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    wrapped = comfy_sd15[0].clone()
    wrapped.set_model_unet_function_wrapper(wrapper)
    z, ctx = inputs(2, seed=8)
    ours = ComfyDenoiser(wrapped).eps(z, 250, ctx, rows=Rows.cfg(1))
    torch.testing.assert_close(
        ours, ComfyDenoiser(comfy_sd15[0]).eps(z, 250, ctx, rows=Rows.cfg(1)), atol=0, rtol=0
    )
    assert seen == [[1, 0]]


def test_devices_and_dtypes(comfy_sd15: Any) -> None:
    import comfy.model_management as mm

    model = comfy_sd15[0]
    den = ComfyDenoiser(model)
    assert den.device == mm.get_torch_device() == model.load_device
    assert den.dtype == torch.float32 and ComfyDenoiser(model, for_grad=True).dtype == torch.float32
    z, ctx = inputs(1)
    assert den.eps(z.double(), 10, ctx).dtype == torch.float64  # ε comes back in z's dtype


def test_controller_without_step_is_refused(comfy_sd15: Any) -> None:
    z, ctx = inputs(1)
    with pytest.raises(ValueError, match="step"):
        ComfyDenoiser(comfy_sd15[0]).eps(z, 400, ctx, controller=Recorder())


def test_value_context_feeds_conditional_values_only(comfy_sd15: Any) -> None:
    den = ComfyDenoiser(comfy_sd15[0])
    z, ctx = inputs(2, seed=3)
    z[1] = z[0]
    rows = Rows.cfg(1)
    base = den.eps(z, 600, ctx, rows=rows)
    same = den.eps(z, 600, ctx, rows=rows, value_context=ctx)
    torch.testing.assert_close(same, base, atol=1e-6, rtol=0)
    other = den.eps(z, 600, ctx, rows=rows, value_context=torch.randn_like(ctx))
    torch.testing.assert_close(other[0], base[0], atol=1e-6, rtol=0)  # uncond row untouched
    assert (other[1] - base[1]).abs().max() > 1e-3


def test_matches_diffusers_host_with_rows_and_values(
    comfy_sd15: Any, tiny_checkpoint: Path, tiny_spec: comfy_support.TinySpec
) -> None:
    hosts = pytest.importorskip("nti_core.hosts.diffusers")
    unet = comfy_support.diffusers_unet(tiny_checkpoint, tiny_spec)
    ref = hosts.DiffusersDenoiser(unet, ComfyDenoiser(comfy_sd15[0]).alphas_cumprod)
    den = ComfyDenoiser(comfy_sd15[0])
    z, ctx = inputs(4, seed=4)
    vctx = torch.randn_like(ctx)
    kw = {"rows": Rows.cfg(2), "step": 1, "value_context": vctx}
    rec_a, rec_b = Recorder(), Recorder()
    ours = den.eps(z, 800, ctx, controller=rec_a, **kw)
    theirs = ref.eps(z, 800, ctx, controller=rec_b, **kw)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert {c["site"] for c in rec_a.calls} == {c["site"] for c in rec_b.calls}
    assert same_model(den.fingerprint(), ref.fingerprint())


# ============================================================== gradients, purity, fingerprints


def test_gradient_through_eps_under_inference_mode(tiny_checkpoint: Path) -> None:
    with torch.inference_mode():  # as inside a ComfyUI node: weights become inference tensors
        model, _, _ = comfy_support.load_comfy_checkpoint(tiny_checkpoint)
        assert next(model.model.diffusion_model.parameters()).is_inference()
        z, ctx = inputs(1, seed=5)
        den = ComfyDenoiser(model, for_grad=True)
        reference = ComfyDenoiser(model).eps(z, 500, ctx)
        with autograd():
            null = ctx.clone().requires_grad_(True)
            eps = den.eps(z, 500, null, step=0, controller=Recorder())
            eps.square().mean().backward()
            with pytest.raises(RuntimeError, match="for_grad=True"):
                ComfyDenoiser(model).eps(z, 500, null)
        grad = null.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
    torch.testing.assert_close(eps.detach(), reference, atol=1e-5, rtol=0)


def test_input_model_is_left_alone(comfy_sd15: Any) -> None:
    import comfy.model_management

    model = comfy_sd15[0]
    before = comfy_support.patcher_state(model)
    z, ctx = inputs(2, seed=6)
    ComfyDenoiser(model).eps(z, 100, ctx, rows=Rows.cfg(1), step=0, controller=Recorder())
    with autograd():
        null = ctx.clone().requires_grad_(True)
        ComfyDenoiser(model, for_grad=True).eps(z, 100, null).sum().backward()
    assert comfy_support.patcher_state(model) == before
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    comfy.model_management.load_models_gpu([model])  # the plain MODEL loads without wrappers
    assert all(
        not getattr(m, "weight_function", []) for m in model.model.diffusion_model.modules()
    )


def test_weight_patch_changes_fingerprint(comfy_sd15: Any, tiny_diffusers_unet: Any) -> None:
    model = comfy_sd15[0]
    base = ComfyDenoiser(model).fingerprint()
    assert same_model(base, model_fingerprint(list(tiny_diffusers_unet.parameters())))
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    shape = model.model.state_dict()[key].shape
    lora = model.clone()
    lora.add_patches({key: (0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(0)),)})
    patched = ComfyDenoiser(lora).fingerprint()
    assert not same_model(base, patched)
    assert same_model(ComfyDenoiser(model).fingerprint(), base)  # un-patched again on reload


# ============================================================== ComfyUI's own sampler, interrupts


def test_bound_controller_through_comfy_sampler(comfy_sd15: Any) -> None:
    import comfy.sample

    rec = Recorder()
    patched = patch_model(comfy_sd15[0], controller=rec)
    z, ctx = inputs(2, seed=7)
    comfy.sample.sample(
        patched, torch.randn(2, 4, H, W), 3, 5.0, "ddim", "ddim_uniform",
        [[ctx[:1], {}]], [[ctx[1:], {}]], torch.zeros(2, 4, H, W), disable_pbar=True, seed=0,
    )
    assert {c["step"] for c in rec.calls} == {0, 1, 2}
    for c in rec.calls:  # each chunk is the whole latent batch: slots 0, 1 per chunk
        assert c["slot"] == [0, 1] * (c["batch"] // 2)
    assert {b for c in rec.calls for b in c["branch"]} == {True, False}


def test_check_interrupt(comfy_root: Path) -> None:
    import comfy.model_management as mm

    check_interrupt()
    mm.interrupt_current_processing(True)
    with pytest.raises(mm.InterruptProcessingException):
        check_interrupt()
    check_interrupt()  # the flag is consumed


# ============================================================== the reference pipeline


def test_retraces_the_reference_pipelines_inversion(
    comfy_sd15: Any, tiny_checkpoint: Path, tiny_spec: comfy_support.TinySpec
) -> None:
    """diffusers' community NullTextPipeline (from $NTI_DIFFUSERS_PATH) on the same UNet weights
    and the same conditioning tensors: the ComfyUI host's inversion retraces it to 1e-4."""
    from core_support import community_null_text_pipeline, tiny_model

    from nti_core import ddim_invert

    model, clip, _ = comfy_sd15
    steps = 10
    parts = tiny_model()  # VAE, text encoder, tokenizer: the pipeline wants them, never uses them
    unet = comfy_support.diffusers_unet(tiny_checkpoint, tiny_spec)
    pipe = community_null_text_pipeline(unet, parts.vae, parts.text_encoder, parts.tokenizer, steps)
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a cat sitting next to a mirror"))
        null = clip.encode_from_tokens(clip.tokenize(""))
    context = torch.cat([null, cond]).clone()
    z0 = inputs(1, seed=7)[0] * 0.5
    with torch.no_grad():
        theirs = torch.cat(pipe.ddim_inversion_loop(z0, context))
    den = ComfyDenoiser(model)
    grid = make_grid(den.alphas_cumprod, steps, "reference")
    ours = ddim_invert(den, z0, context[1:], grid, "a cat sitting next to a mirror")
    gap = float((ours.latents - theirs).abs().max())
    assert gap < 1e-4, gap
    uniform = ddim_invert(den, z0, context[1:], make_grid(den.alphas_cumprod, steps, "ddim_uniform"),
                          "a cat sitting next to a mirror")
    assert float((uniform.latents - theirs).abs().max()) > 100 * max(gap, 1e-6)


# ============================================================== StyleDiffusion's pieces


def test_maps_and_value_gradients_match_the_diffusers_host(
    quarter_sd15: Any, http_checkpoint: Path
) -> None:
    """The same recorded maps on both hosts (shared weights), values reach only conditional rows
    in one call or two, and a gradient reaches the value input through the ComfyUI UNet."""
    from nti_core import ddim_invert
    from nti_core.attention.controller import MapRecorder
    from nti_core.hosts.comfy import autograd
    from nti_core.hosts.diffusers import DiffusersDenoiser

    unet = comfy_support.diffusers_unet(http_checkpoint, comfy_support.HTTP_SPEC)
    den = ComfyDenoiser(quarter_sd15[0])
    ref = DiffusersDenoiser(unet, den.alphas_cumprod)
    z, ctx = inputs(1, seed=5)
    grid = make_grid(den.alphas_cumprod, 3, "reference")
    ours = ddim_invert(den, z, ctx, grid, "p", record_maps=True)
    theirs = ddim_invert(ref, z, ctx, grid, "p", record_maps=True)
    assert ours.maps is not None and ours.maps.shape == theirs.maps.shape
    torch.testing.assert_close(ours.maps, theirs.maps, atol=1e-4, rtol=0)
    z2, ctx2 = inputs(2, seed=6)
    vctx = torch.randn_like(ctx2)
    rows = Rows.cfg(1)
    one = den.eps(z2, 500, ctx2, rows=rows, value_context=vctx)
    two = ComfyDenoiser(quarter_sd15[0], separate_calls=True).eps(z2, 500, ctx2, rows=rows,
                                                                 value_context=vctx)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
    with autograd():
        den_g = ComfyDenoiser(quarter_sd15[0], for_grad=True)
        value = vctx[1:].clone().requires_grad_(True)
        rec = MapRecorder((H // 4, W // 4), branch=True, detach=False)
        eps = den_g.eps(z2[1:].clone(), 500, ctx2[1:].clone(), step=0, controller=rec,
                        value_context=value)
        (eps.square().mean() + rec.step_maps(0).square().mean()).backward()
    assert value.grad is not None and float(value.grad.abs().max()) > 0
