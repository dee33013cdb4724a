"""Other packs' and ComfyUI's own patches on the MODEL meet the edit (issue 20, part 5).

ComfyUI's own FreeU_V2, RescaleCFG and PerturbedAttentionGuidance nodes, a LoRA loaded by
ComfyUI's LoRA loader, and a replace hook installed the way IPAdapter installs it, on the tiny
SD1.5 checkpoint (tests/comfy_support.py). Needs $COMFYUI_PATH (skipped, saying so, without it).
"""

from __future__ import annotations

import math
from typing import Any

import comfy_support
import pytest
import torch
from torch import Tensor

from nti_core.denoiser import Rows, Site, sdpa
from nti_core.hosts.comfy import STATE_KEY, CallState, ComfyDenoiser, make_replace
from nti_core.inversion import ddim_invert
from nti_core.null_text import plain_null
from nti_core.sampling import p2p_sample
from nti_core.schedule import make_grid, sample_step

H = W = 8  # latent 8×8 (64² pixels)
T = 500


def inputs(batch: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, H, W, generator=g), torch.randn(batch, 77, 768, generator=g)


def comfy_eps(model: Any, z: Tensor, t: int, ctx: Tensor) -> Tensor:
    """ε by ComfyUI's own ``calc_cond_batch`` on ``model`` (conditional rows), as its sampler."""
    import comfy.model_management
    import comfy.samplers

    from nti_core.hosts.comfy.patches import comfy_conds

    comfy.model_management.load_models_gpu([model])
    model.pre_run()
    sigma = float(model.get_model_object("model_sampling").sigmas[t])
    x = z * math.sqrt(1 + sigma * sigma)
    s = torch.full((z.shape[0],), sigma)
    (denoised,) = comfy.samplers.calc_cond_batch(model.model, [comfy_conds(ctx)], x, s,
                                                 model.model_options)
    return (x - denoised) / sigma


@pytest.fixture(autouse=True)
def no_grad() -> Any:
    """As in a node (no autograd): the hooks then run ComfyUI's attention kernel throughout."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def freeu_sized(comfy_root: Any) -> Any:
    """The tiny UNet with a 640-channel second level: FreeU scales 2× and 4× model_channels
    (the shared tiny checkpoint is 320 wide throughout). UNet only, loaded by ComfyUI."""
    import comfy.sd

    spec = comfy_support.TinySpec(channel_mult=(1, 2))
    sd = comfy_support.build_state_dict(spec, comfy_support.DEFAULT_SEED, parts=("unet",))
    prefix = comfy_support.UNET_PREFIX
    return comfy.sd.load_diffusion_model_state_dict(
        {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})


class IPStyleHook:
    """An attn2 replace hook of IPAdapter's form: base attention + an image-token term."""

    def __init__(self, inner: int, weight: float = 0.5) -> None:
        g = torch.Generator().manual_seed(5)
        self.k, self.v, self.weight = torch.randn(4, inner, generator=g), torch.randn(
            4, inner, generator=g), weight

    def added(self, q: Tensor, heads: int) -> Tensor:
        b = q.shape[0]
        return self.weight * sdpa(q, self.k.to(q).expand(b, -1, -1), self.v.to(q).expand(b, -1, -1),
                                  heads)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Any]) -> Tensor:
        from comfy.ldm.modules.attention import optimized_attention

        heads = extra["n_heads"]
        return optimized_attention(q, k, v, heads) + self.added(q, heads)


def install_ip_style(model: Any, key: tuple, hook: Any) -> Any:
    """IPAdapter_plus's ``set_model_patch_replace``: copy the dicts, put the hook at the key."""
    m = model.clone()
    to = m.model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
    to["patches_replace"]["attn2"][key] = hook
    m.model_options["transformer_options"] = to
    return m


class AddConstant:
    """A controller that edits every row: plain attention + 0.25."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, heads: int, site: Site,
               hw: tuple[int, int], step: int, rows: Rows) -> Tensor:
        return sdpa(q, k, v, heads) + 0.25

    def after_step(self, step: int, latents: Tensor) -> Tensor:
        return latents


class Plain(AddConstant):
    def attend(self, q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
        return sdpa(q, k, v, kw["heads"])


# ============================================================== attention replace hooks


def test_patches_displaced_hook_runs_in_plain_and_controlled_rows(comfy_sd15: Any) -> None:
    """IPAdapter's key (block, number) under our (block, number, depth): its term is kept."""
    model = comfy_sd15[0]
    hook = IPStyleHook(320)
    ip = install_ip_style(model, ("input", 1), hook)
    z, ctx = inputs(2, seed=1)
    base = ComfyDenoiser(model).eps(z, T, ctx)
    plain = ComfyDenoiser(ip).eps(z, T, ctx)
    torch.testing.assert_close(plain, comfy_eps(ip, z, T, ctx), atol=1e-5, rtol=0)
    assert (plain - base).abs().max() > 1e-3  # the hook ran
    rows = Rows.cfg(1)
    controlled = ComfyDenoiser(ip).eps(z, T, ctx, rows=rows, step=0, controller=Plain())
    torch.testing.assert_close(controlled, ComfyDenoiser(ip).eps(z, T, ctx, rows=rows),
                               atol=1e-5, rtol=0)


def test_patches_displaced_hook_adds_its_term_to_the_controller(comfy_root: Any) -> None:
    """Controlled rows: controller's attention + (hook − plain attention), exactly the added term."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 64, generator=g) for _ in range(3))
    hook = IPStyleHook(64)
    call = CallState(controller=AddConstant(), step_sigmas=torch.tensor([1.0], dtype=torch.float64),
                     step_ids=(3,))
    extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "activations_shape": [2, 64, 4, 4],
             "sigmas": torch.tensor([1.0]), STATE_KEY: call}
    site = Site("input", 1, 0, True)

    def hooked(q: Tensor, k: Tensor, v: Tensor, extra: dict[str, Any]) -> Tensor:
        return sdpa(q, k, v, 8) + hook.added(q, 8)

    out = make_replace(site, displaced=hooked)(q, k, v, extra)
    torch.testing.assert_close(out, sdpa(q, k, v, 8) + 0.25 + hook.added(q, 8), atol=1e-5, rtol=0)
    extra[STATE_KEY] = CallState()  # no controller: the displaced hook alone, bit for bit
    torch.testing.assert_close(make_replace(site, displaced=hooked)(q, k, v, extra),
                               hooked(q, k, v, extra), atol=0, rtol=0)


# ============================================================== transformer patches, LoRA


def test_patches_freeu_runs_as_in_comfy(freeu_sized: Any) -> None:
    from comfy_extras.nodes_freelunch import FreeU_V2

    z, ctx = inputs(1, seed=2)
    base = ComfyDenoiser(freeu_sized).eps(z, T, ctx)
    freeu = FreeU_V2().patch(freeu_sized, 1.3, 1.4, 0.9, 0.2)[0]
    ours = ComfyDenoiser(freeu).eps(z, T, ctx)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, comfy_eps(freeu, z, T, ctx), atol=1e-5, rtol=0)


def test_patches_lora_runs_as_in_comfy(comfy_sd15: Any) -> None:
    import comfy.sd

    model = comfy_sd15[0]
    z, ctx = inputs(1, seed=2)
    base = ComfyDenoiser(model).eps(z, T, ctx)
    g = torch.Generator().manual_seed(3)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    lora = {f"{name}.lora_up.weight": torch.randn(320, 4, generator=g) * 0.1,
            f"{name}.lora_down.weight": torch.randn(4, 768, generator=g) * 0.1,
            f"{name}.alpha": torch.tensor(4.0)}
    loaded = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]  # LoraLoaderModelOnly
    ours = ComfyDenoiser(loaded).eps(z, T, ctx)
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(ours, comfy_eps(loaded, z, T, ctx), atol=1e-5, rtol=0)


def test_patches_apply_model_wrapper_is_passed_along(comfy_sd15: Any) -> None:
    seen: list[int] = []

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Tensor:
        seen.append(args[0].shape[0])
        return executor(*args, **kwargs) * 1.0

    wrapped = comfy_sd15[0].clone()
    wrapped.add_wrapper("apply_model", wrapper)
    z, ctx = inputs(2, seed=4)
    out = ComfyDenoiser(wrapped).eps(z, T, ctx, rows=Rows.cfg(1))
    torch.testing.assert_close(out, ComfyDenoiser(comfy_sd15[0]).eps(z, T, ctx, rows=Rows.cfg(1)),
                               atol=1e-6, rtol=0)
    assert seen == [2]


# ============================================================== CFG functions


def rescale_by_hand(x: Tensor, sigma: float, eps_u: Tensor, eps_c: Tensor, w: float,
                    m: float) -> Tensor:
    """RescaleCFG (Lin et al. 2024, eq. 15–16) on v = √(1+σ²)·(x/(1+σ²) − x̂₀)/σ·…, written out."""
    a = math.sqrt(1 + sigma * sigma)
    v_c, v_u = (((x / a**2) - (x - sigma * e)) * a / sigma for e in (eps_c, eps_u))
    v_cfg = v_u + w * (v_c - v_u)
    std = lambda t: t.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
    v = m * v_cfg * std(v_c) / std(v_cfg) + (1 - m) * v_cfg
    denoised = x / a**2 - v * sigma / a
    return (x - denoised) / sigma


def tiny_inversion(model: Any, steps: int = 2) -> tuple[Any, Any, Tensor, Tensor]:
    den = ComfyDenoiser(model)
    z0, ctx = inputs(3, seed=6)
    grid = make_grid(den.alphas_cumprod, steps, "reference")
    traj = ddim_invert(den, z0[:1] * 0.5, ctx[:1], grid, "source")
    return traj, plain_null(traj, ctx[2:3], 7.5), ctx[:2], ctx[2:3]


def test_patches_rescale_cfg_in_p2p_sampling_equals_hand_steps(comfy_sd15: Any) -> None:
    from comfy_extras.nodes_model_advanced import RescaleCFG

    model = comfy_sd15[0]
    rescaled = RescaleCFG().patch(model, 0.7)[0]
    traj, null, contexts, _ = tiny_inversion(model)
    ours = p2p_sample(ComfyDenoiser(rescaled), traj, null, contexts)
    den = ComfyDenoiser(model)
    z = traj.z_T.expand(2, -1, -1, -1).clone()
    for i in range(traj.num_steps):  # the loop by hand, the guidance written out
        t = traj.grid.timesteps[i]
        eps_u, eps_c = den.eps(torch.cat([z, z]), t, torch.cat([null.at(i).expand(2, -1, -1),
                                                                 contexts]),
                               rows=Rows.cfg(2), step=i).chunk(2)
        sigma = den.sigma(t)
        x = z * math.sqrt(1 + sigma * sigma)
        z = sample_step(traj.grid, i, z, rescale_by_hand(x, sigma, eps_u, eps_c, 7.5, 0.7))
    torch.testing.assert_close(ours, z, atol=1e-4, rtol=1e-4)
    plain = p2p_sample(den, traj, null, contexts)
    assert (plain - ours).abs().max() > 1e-3  # the rescale changed the result


def test_patches_plain_model_is_bit_identical_to_the_formula(comfy_sd15: Any) -> None:
    model = comfy_sd15[0]
    den = ComfyDenoiser(model)
    z, ctx = inputs(2, seed=7)
    assert den.guide(z, T, z, z, 7.5, cond=ctx, uncond=ctx) is None
    traj, null, contexts, _ = tiny_inversion(model)
    ours = p2p_sample(den, traj, null, contexts)
    z = traj.z_T.expand(2, -1, -1, -1).clone()
    for i in range(traj.num_steps):  # the code before the guidance function
        t = traj.grid.timesteps[i]
        eps_u, eps_c = den.eps(torch.cat([z, z]), t, torch.cat([null.at(i).expand(2, -1, -1),
                                                                 contexts]),
                               rows=Rows.cfg(2), step=i).chunk(2)
        z = sample_step(traj.grid, i, z, eps_u + 7.5 * (eps_c - eps_u))
    torch.testing.assert_close(ours, z, atol=0, rtol=0)


def test_patches_pag_guidance_equals_its_perturbed_pass(comfy_sd15: Any) -> None:
    """PAG: x̂₀ = CFG + s·(x̂₀_c − x̂₀_perturbed) ⇔ ε = ε_cfg + s·(ε_c − ε_perturbed), the
    perturbed pass = the middle block's self-attention replaced by its values."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    model = comfy_sd15[0]
    pag = PerturbedAttentionGuidance.execute(model, 2.0).result[0]
    z, ctx = inputs(2, seed=8)
    den = ComfyDenoiser(pag)
    null = ctx[:1].expand(2, -1, -1)
    eps_u, eps_c = ComfyDenoiser(model).eps(torch.cat([z, z]), T, torch.cat([null, ctx]),
                                            rows=Rows.cfg(2)).chunk(2)
    ours = den.guide(z, T, eps_u, eps_c, 5.0, cond=ctx, uncond=null)
    perturbed = model.clone()
    perturbed.set_model_attn1_replace(lambda q, k, v, extra: v, "middle", 0)
    eps_p = ComfyDenoiser(perturbed).eps(z, T, ctx)
    expected = eps_u + 5.0 * (eps_c - eps_u) + 2.0 * (eps_c - eps_p)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert (eps_c - eps_p).abs().max() > 1e-3


def test_patches_null_text_is_fitted_under_the_models_guidance(comfy_sd15: Any) -> None:
    """The optimisation's guided step applies RescaleCFG too: step 0's first loss equals
    MSE(DDIM(z_T, rescaled ε(""), z*_{N−1})) by hand, and differs from the plain model's."""
    from comfy_extras.nodes_model_advanced import RescaleCFG

    from nti_core import NullTextOptions, null_text_optimize
    from nti_core.hosts.comfy import autograd

    model = comfy_sd15[0]
    rescaled = RescaleCFG().patch(model, 0.7)[0]
    traj, null, _, empty = tiny_inversion(model)
    options = NullTextOptions(inner_steps=2)
    with autograd():
        ours = null_text_optimize(ComfyDenoiser(rescaled, for_grad=True), traj, empty, options)
        plain = null_text_optimize(ComfyDenoiser(model, for_grad=True), traj, empty, options)
    den, t, z = ComfyDenoiser(model), traj.grid.timesteps[0], traj.z_T
    eps_u, eps_c = den.eps(torch.cat([z, z]), t, torch.cat([empty, traj.embedding])).chunk(2)
    sigma = den.sigma(t)
    eps = rescale_by_hand(z * math.sqrt(1 + sigma * sigma), sigma, eps_u, eps_c, 7.5, 0.7)
    by_hand = float((sample_step(traj.grid, 0, z, eps) - traj.latents[-2:-1]).pow(2).mean())
    assert ours.first_loss[0] == pytest.approx(by_hand, rel=1e-3)
    assert abs(plain.first_loss[0] - by_hand) > 1e-3 * by_hand


# ============================================================== refusals


@pytest.mark.parametrize("kind", ["denoise_mask", "predict_noise", "cleanup_callback"])
def test_patches_refused_before_work_naming_the_patch(comfy_sd15: Any, kind: str) -> None:
    def my_patch(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a refused patch must never run")

    m = comfy_sd15[0].clone()
    if kind == "denoise_mask":
        m.set_model_denoise_mask_function(my_patch)
        named = "model_options['denoise_mask_function']"
    elif kind == "predict_noise":
        m.add_wrapper("predict_noise", my_patch)
        named = "a wrapper of type 'predict_noise'"
    else:
        m.add_callback("on_cleanup", my_patch)
        named = "a callback of type 'on_cleanup'"
    with pytest.raises(ValueError) as err:
        ComfyDenoiser(m)
    message = str(err.value)
    assert message.startswith("the MODEL carries patches NTI Photo Edit cannot run: ")
    assert named in message
    assert f"{my_patch.__module__}.{my_patch.__qualname__}" in message
    assert "connect the MODEL from before the node that added them" in message
