"""The precision policy (nti_core.precision): what each choice resolves to, fp16 loss scaling,
mixed-precision optimisation in real bf16 / fp16 compute on the CPU (the diffusers host), the
fp32 optimisation of a half UNet, gradient checkpointing, and the CLI's --dtype / --precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nti_core import NullTextOptions, ddim_invert, make_grid, null_text_optimize
from nti_core.precision import AUTO, PRECISIONS, LossScaler, resolve
from nti_core.sampling import p2p_sample

# ----------------------------------------------------------------------------- the policy


def test_an_fp32_model_optimises_in_fp32_whatever_is_asked() -> None:
    for choice in PRECISIONS:
        p = resolve(choice, torch.float32)
        assert p.compute == torch.float32 and not p.changed and not p.loss_scaling
        assert "computes in fp32 already" in p.describe()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_models_get_what_is_asked_and_auto_follows_the_measured_table(half) -> None:
    assert resolve("model", half).compute == half
    assert resolve("fp32", half).compute == torch.float32 and resolve("fp32", half).changed
    auto = resolve("auto", half)
    assert auto.compute == (half if AUTO[half] == "model" else torch.float32)
    assert "auto →" in auto.describe() and "docs/precision.md" in auto.describe()
    assert resolve("model", half).loss_scaling == (half == torch.float16)


def test_the_report_line_names_the_compute_dtype_loss_scaling_and_what_stays_fp32() -> None:
    line = resolve("model", torch.float16).describe()
    assert "UNet forward and backward in fp16 with dynamic loss scaling" in line
    assert "∅/values, Adam and the loss in fp32" in line
    assert "with dynamic loss scaling" not in resolve("model", torch.bfloat16).describe()


def test_an_fp8_model_optimises_in_fp32_and_says_why() -> None:
    p = resolve("model", torch.float8_e4m3fn)
    assert p.compute == torch.float32 and "float8_e4m3fn is no dtype to optimise in" in p.why


def test_an_unknown_precision_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'fp32', 'model'\), "
                                         r"got 'fp8'"):
        resolve("fp8", torch.float16)


# ----------------------------------------------------------------------------- loss scaling


def test_fp16_gradients_of_a_tiny_loss_vanish_without_loss_scaling_and_not_with_it() -> None:
    """The gradient of an fp32 MSE of ~1e-8 per element of a 64×64 latent (what null-text's
    loss of ~1e-5 gives) is below fp16's smallest subnormal (6e-8): an fp16 backward drops it;
    scaled by 2^16 it stays exact to fp16's precision."""
    n = 4 * 64 * 64
    delta = 2e-4  # z̃ − z* per element: the loss is delta² = 4e-8, its gradient −2·delta/n
    exact = torch.full((n,), -2 * delta / n)
    grads = {}
    for name, scaler in (("fp16", LossScaler(enabled=False)), ("fp16 scaled", LossScaler())):
        p = torch.zeros(n, requires_grad=True)
        y = p.half() + 1.0  # an fp16 activation, exactly 1.0
        assert scaler.backward(F.mse_loss(y.float(), torch.full((n,), 1.0 + delta)), [p])
        grads[name] = p.grad
    assert torch.equal(grads["fp16"], torch.zeros(n))  # underflowed
    torch.testing.assert_close(grads["fp16 scaled"], exact, rtol=1e-3, atol=0)


def test_the_loss_scaler_skips_a_step_whose_gradients_overflowed_and_halves_its_scale() -> None:
    p = torch.ones(3, requires_grad=True)
    scaler = LossScaler(scale=2.0**16)
    assert not scaler.backward((p.half() * 6e4).float().sum(), [p])  # 6e4·2^16 overflows fp16
    assert p.grad is None and scaler.scale == 2.0**15 and scaler.skipped == 1
    assert scaler.backward((p.half() * 1e-3).float().sum(), [p])
    torch.testing.assert_close(p.grad, torch.full((3,), 1e-3), rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- mixed precision


def _demo_setup(size: int = 64, steps: int = 4):
    from core_support import PHOTOS, demo_model, photo_image

    m = demo_model()
    x = photo_image("gnochi_mirror", size)
    return m, m.encode_image(x), m.encode_prompt(PHOTOS["gnochi_mirror"]), m.encode_prompt(""), \
        make_grid(m.alphas_cumprod, steps), PHOTOS["gnochi_mirror"]


class DtypeSpy:
    """Records the dtype of every UNet input and of the gradients that flowed back into its
    output (a backward through the UNet)."""

    def __init__(self, unet) -> None:
        self.inputs: set[torch.dtype] = set()
        self.backward: list[torch.dtype] = []
        self.handles = [unet.register_forward_pre_hook(self._pre),
                        unet.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self.inputs.add(args[0].dtype)

    def _post(self, module, args, out):
        if out.sample.requires_grad:
            out.sample.register_hook(lambda g: self.backward.append(g.dtype))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_null_text_optimises_fp32_uncond_through_a_half_unet_within_the_measured_bound(half):
    """Real half-precision compute on the CPU (bench/precision.py measured the demo model at
    64², 4 steps: null-text-fast's reconstruction 1.44× all-fp32's error in bf16, 1.03× in
    fp16): ∅ stays fp32, the UNet's forward and backward run in ``half``, fp16 loss-scaled."""
    from nti_core.hosts.diffusers import cast_unet

    m, z0, cond, null, grid, prompt = _demo_setup()
    errors = {}
    try:
        for dtype in (torch.float32, half):
            cast_unet(m.unet, dtype)
            prec = resolve("model", dtype)
            traj = ddim_invert(m.denoiser, z0, cond, grid, prompt)
            spy = DtypeSpy(m.unet)
            with m.denoiser.optimising(prec):
                uncond = null_text_optimize(m.denoiser, traj, null, NullTextOptions(fast=True),
                                            precision=prec)
            spy.close()
            assert spy.inputs == {dtype} and set(spy.backward) == {dtype}
            assert uncond.embeddings.dtype == torch.float32
            assert not torch.equal(uncond.embeddings, cond.expand_as(uncond.embeddings))
            assert all(torch.isfinite(torch.tensor(uncond.final_loss)))
            assert ("dynamic loss scaling" in uncond.precision) == (dtype == torch.float16)
            rec = p2p_sample(m.denoiser, traj, uncond, traj.embedding)
            errors[dtype] = float(F.mse_loss(rec, z0))
    finally:
        cast_unet(m.unet, torch.float32)
    assert errors[half] <= 1.5 * errors[torch.float32], errors


def test_precision_fp32_runs_a_half_unet_in_fp32_and_gives_it_back_bit_identical() -> None:
    from nti_core.hosts.diffusers import cast_unet

    m, z0, cond, null, grid, prompt = _demo_setup(steps=2)
    try:
        cast_unet(m.unet, torch.bfloat16)
        before = {k: v.clone() for k, v in m.unet.state_dict().items()}
        traj = ddim_invert(m.denoiser, z0, cond, grid, prompt)
        prec = resolve("fp32", torch.bfloat16)
        spy = DtypeSpy(m.unet)
        with m.denoiser.optimising(prec):
            assert m.denoiser.dtype == torch.float32
            uncond = null_text_optimize(m.denoiser, traj, null, NullTextOptions(inner_steps=2),
                                        precision=prec)
        spy.close()
        assert spy.inputs == {torch.float32}
        assert "UNet forward and backward in fp32 (the model computes in bf16)" in uncond.report()
        after = m.unet.state_dict()
        assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v)
                   for k, v in before.items())
        with pytest.raises(ValueError, match="computes in torch.bfloat16 but the precision asks"):
            null_text_optimize(m.denoiser, traj, null, precision=prec)  # outside the session
    finally:
        cast_unet(m.unet, torch.float32)


def test_gradient_checkpointing_gives_the_same_uncond_and_keeps_less_for_the_backward() -> None:
    """diffusers' checkpointing of the UNet's blocks with the engine's processors: the call's
    state travels with the call, so recomputed blocks see their own controller and values."""
    from core_support import tiny_model

    from nti_core.attention.controller import MapRecorder
    from nti_core.null_text import UNCOND_ROW

    m = tiny_model()
    z0 = m.encode_image(torch.zeros(1, 3, 64, 64))
    cond, null = m.encode_prompt("a cat sitting next to a mirror"), m.encode_prompt("")
    traj = ddim_invert(m.denoiser, z0, cond, make_grid(m.alphas_cumprod, 3), "p",
                       record_maps=True)
    prec = resolve("auto", torch.float32)
    runs, kept = {}, {}
    for ckpt in (False, True):
        with m.denoiser.optimising(prec, checkpointing=ckpt):
            runs[ckpt] = null_text_optimize(m.denoiser, traj, null,
                                            NullTextOptions(inner_steps=3, attention_weight=1.0),
                                            precision=prec)
            u = null.clone().requires_grad_(True)
            rec = MapRecorder((2, 2), branch=False, detach=False)
            kept[ckpt] = saved_bytes(lambda u=u, rec=rec: m.denoiser.eps(
                z0, 500, u, rows=UNCOND_ROW, step=0, controller=rec))
    assert torch.equal(runs[True].embeddings, runs[False].embeddings)
    assert runs[True].attention_loss == runs[False].attention_loss
    assert kept[True] < 0.5 * kept[False], kept


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of ``fn()``."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    from core_support import demo_model
    from tiny_models import save_pipeline

    return save_pipeline(demo_model(), tmp_path_factory.mktemp("demo_pipeline") / "demo")


def test_cli_dtype_bf16_computes_in_bf16_and_differs_from_fp32_by_the_measured_amount(
        tmp_path, demo_folder):
    """--dtype bf16 loads and inverts in bf16; --precision auto then optimises and samples in
    fp32 (precision.AUTO), --precision model in bf16. Measured at 64², 4 steps (printed):
    auto's reconstruction error 1.005× fp32's, model's 1.70×; their pixels differ from fp32's
    by 0.18/255 and 1.58/255 on average."""
    from core_support import CAT

    from nti_core.app import main

    reports, images = {}, {}
    for name, dtype, precision in (("fp32", "fp32", "auto"), ("bf16", "bf16", "auto"),
                                   ("bf16 model", "bf16", "model")):
        out = tmp_path / name.replace(" ", "_")
        argv = ["edit", "--model", str(demo_folder), "--image", str(CAT), "--source",
                "a photo of a cat sitting next to a mirror", "--target",
                "a negative of a cat sitting next to a mirror", "--size", "64", "--crop",
                "--steps", "4",  # the centre square, as measured
                "--method", "null-text-fast", "--dtype", dtype, "--precision", precision,
                "--no-attention-maps", "--out", str(out)]
        assert main(argv) == 0
        reports[name] = json.loads((out / "report.json").read_text())
        from PIL import Image

        with Image.open(out / "reconstruction.png") as im:
            images[name] = torch.from_numpy(np.asarray(im, dtype=np.float32))
    auto, model = reports["bf16"]["precision"], reports["bf16 model"]["precision"]
    assert auto["model_compute"] == model["model_compute"] == "bfloat16"
    expected = "bfloat16" if AUTO[torch.bfloat16] == "model" else "float32"
    assert auto["optimisation_compute"] == reports["bf16"]["sampling_compute"] == expected
    assert model["optimisation_compute"] == reports["bf16 model"]["sampling_compute"] \
        == "bfloat16"
    assert reports["fp32"]["precision"]["optimisation_compute"] == "float32"
    err = {k: r["reconstruction"]["latent_mse"] for k, r in reports.items()}
    diff = {k: float((images[k] - images["fp32"]).abs().mean()) for k in ("bf16", "bf16 model")}
    print(f"CLI --dtype bf16 vs fp32: reconstruction latent MSE {err}, mean pixel "
          f"difference to fp32 {diff} (of 255)")
    assert all(d > 0 for d in diff.values())  # bf16 really ran (inversion, text, VAE)
    assert err["bf16"] <= 1.1 * err["fp32"] and err["bf16 model"] <= 2.0 * err["fp32"]
    assert all(d < 2.0 for d in diff.values())


def test_checkpointing_goes_on_where_the_backward_does_not_fit_the_free_gpu_memory(monkeypatch):
    """SDXL at 1024² in fp16 keeps 9.8 GB for the backward (bench/memory.py): with 10 GB free
    (a 16 GB card holding the 5 GB of weights) that is too tight, with 20 GB it is not; never on
    the CPU."""
    from nti_core.memory import backward_bytes, checkpointing_needed

    need = backward_bytes("sdxl", (128, 128), torch.float16)
    assert 9.5e9 < need < 10e9
    for free, expected in ((10e9, True), (20e9, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free: (int(f), 80e9))
        assert checkpointing_needed("sdxl", (128, 128), torch.float16,
                                    torch.device("cuda")) is expected
    assert not checkpointing_needed("sdxl", (128, 128), torch.float16, torch.device("cpu"))


def test_the_cli_pipeline_samples_in_the_dtype_the_uncond_was_optimised_in() -> None:
    """editing.invert at precision fp32 on a bf16 model, then editing.edit: the UNet computes
    in fp32 for the optimisation and for the sampling with its ∅, and is bf16 again after."""
    from nti_core.attention.plan import P2PSpec
    from nti_core.editing import edit, invert
    from nti_core.hosts.diffusers import cast_unet

    m, z0, _, _, _, prompt = _demo_setup(steps=2)
    try:
        cast_unet(m.unet, torch.bfloat16)
        spy = DtypeSpy(m.unet)
        inv = invert(m, z0, prompt, steps=2, method="null-text-fast", precision="fp32")
        assert inv.uncond.compute == "float32" and spy.inputs == {torch.bfloat16, torch.float32}
        spy.inputs.clear()
        edit(m, inv, P2PSpec(prompt, ("a negative of a cat sitting next to a mirror",)))
        assert spy.inputs == {torch.float32}
        spy.close()
        assert m.denoiser.dtype == torch.bfloat16
    finally:
        cast_unet(m.unet, torch.float32)
