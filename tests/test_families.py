"""SD 2.x and SDXL, ε- and v-prediction, on the diffusers host: the tiny random-weight models of each
family through inversion, null-text, P2P and StyleDiffusion; the v → ε conversion against diffusers'
own DDIM step; SDXL's packed embedding and size conditioning; folders read back by ``load_model``;
what is refused, and the CLI on saved folders. No ComfyUI needed.

The families here: SD 2.x with v (its 768-v models) and ε (its 512 base), SDXL with ε (base 1.0)
and v (v-prediction fine-tunes): one tiny random-weight model each (the ε and v ones of an
architecture differ only in their output scale, see ``tiny_models._quiet_unet``); 128²
photos, 6 steps, the reference's null-text constants.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="the diffusers host needs diffusers")

from core_support import CAT, CAT_PROMPT, ROOT, assert_mostly_close  # noqa: E402
from tiny_models import save_pipeline, tiny_sd2, tiny_sdxl  # noqa: E402

from nti_core import (  # noqa: E402
    ddim_invert,
    make_grid,
    null_text_optimize,
    p2p_sample,
    plain_null,
)
from nti_core.attention.edits import blend_map_size  # noqa: E402
from nti_core.attention.plan import P2PSpec  # noqa: E402
from nti_core.family import SD1, SD2, SDXL, SUPPORTED, TOKENS  # noqa: E402
from nti_core.hosts.diffusers import size_ids  # noqa: E402
from nti_core.hosts.diffusers.models import SDModel, check_model_path, load_model  # noqa: E402
from nti_core.images import load_image  # noqa: E402
from nti_core.schedule import (  # noqa: E402
    sample_step,
    scaled_linear_alphas_cumprod,
    zero_terminal_snr,
)
from nti_core.tokenizer import from_hf  # noqa: E402

FAMILIES = ("sd2-v", "sd2-eps", "sdxl-eps", "sdxl-v")
BUILDERS = {"sd2": tiny_sd2, "sdxl": tiny_sdxl}
SIZE, STEPS = 128, 6
# Measured at 128², 6 steps, K = 10: DDIM round trip at guidance 1 (relative error) and latent MSE
# at guidance 7.5 of DDIM / null-text. SD2-v 0.065, 0.034 / 0.0018 (19.1×); SD2-ε 0.085,
# 0.085 / 0.014 (6.2×); SDXL-ε 0.068, 0.032 / 0.0025 (12.9×); SDXL-v 0.069, 0.015 / 0.0024
# (6.3×). Each ratio stays put with ε perturbed by 3e-5 relative noise (another machine's
# rounding); at 64² SD 2.x's moved between 2.8× and 8.9× under that noise, so 64² is not used.
NTI_GAIN = {"sd2-v": 10.0, "sd2-eps": 4.0, "sdxl-eps": 8.0, "sdxl-v": 4.0}


@cache
def model(key: str) -> SDModel:
    """The tiny model of one of FAMILIES (e.g. "sd2-v"), built once per session."""
    arch, prediction = key.split("-")
    return BUILDERS[arch](seed=0, prediction=prediction)


@cache
def variant(key: str, prediction: str, zero_snr: bool = False) -> SDModel:
    """The weights of ``model(key)`` read with another prediction type or schedule (a copy of
    the UNet: each denoiser installs its own attention processors)."""
    m = model(key)
    alphas = scaled_linear_alphas_cumprod()
    return SDModel(copy.deepcopy(m.unet), m.vae, m.text_encoder, m.tokenizer,
                   zero_terminal_snr(alphas) if zero_snr else alphas,
                   f"{m.name}, {prediction}{', zero-SNR' if zero_snr else ''}",
                   m.family.with_schedule(prediction, zero_snr), m.text_encoder_2, m.tokenizer_2)


@cache
def inverted(key: str):
    """(model, z0, source embedding, ∅ = "", pivot of STEPS steps, null-text ∅ with the
    reference's constants) of the cat photo at 128², once per session."""
    m = model(key)
    z0 = m.encode_image(load_image(CAT, SIZE))
    c, null = m.encode_prompt(CAT_PROMPT), m.encode_prompt("")
    traj = ddim_invert(m.denoiser, z0, c, make_grid(m.alphas_cumprod, STEPS), CAT_PROMPT)
    return m, z0, c, null, traj, null_text_optimize(m.denoiser, traj, null)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ the engine


@pytest.mark.parametrize("key", FAMILIES)
def test_inversion_round_trip_at_guidance_1(key):
    """DDIM inversion and back at guidance 1 with the source prompt returns z₀ up to DDIM's
    step error (ε read one latent early; measured 0.065–0.085, see above)."""
    m, z0, c, _, traj, _ = inverted(key)
    assert traj.embedding.shape == (1, m.family.embedding_rows, m.family.context_dim)
    rec = p2p_sample(m.denoiser, traj, plain_null(traj, c, guidance=1.0), c, guidance=1.0)
    assert rel_err(rec, z0) < 0.12


@pytest.mark.parametrize("key", FAMILIES)
def test_null_text_reconstruction_far_below_ddim(key):
    """At guidance 7.5 DDIM drifts and null-text brings the reconstruction back (NTI_GAIN: the
    measured ratios above, with a margin)."""
    m, z0, c, null, traj, nti = inverted(key)
    ddim = float(F.mse_loss(p2p_sample(m.denoiser, traj, plain_null(traj, null), c), z0))
    ours = float(F.mse_loss(p2p_sample(m.denoiser, traj, nti, c), z0))
    print(f"\n{m.family.label}: DDIM {ddim:.3g}, null-text {ours:.3g} ({ddim / ours:.1f}×)")
    assert math.isfinite(ours) and ours < ddim / NTI_GAIN[key]
    assert nti.embeddings.shape == (STEPS, m.family.embedding_rows, m.family.context_dim)


@pytest.mark.parametrize("key", FAMILIES)
def test_p2p_identical_prompts_reproduce_the_source(key):
    """Source and target rows with the same prompt and full injection stay equal; the source
    row is the plain reconstruction."""
    m, _, c, _, traj, nti = inverted(key)
    spec = P2PSpec(CAT_PROMPT, (CAT_PROMPT,), mode="reweight", cross=1.0, self_steps=1.0)
    ctrl = spec.build(from_hf(m.tokenizer), STEPS, keep_step_maps=True)
    out = p2p_sample(m.denoiser, traj, nti, torch.cat([c, c]), controller=ctrl)
    assert torch.allclose(out[1], out[0], atol=1e-6)
    # a batch of 4 rows instead of 2: kernel rounding (max 1.7e-5 measured) at guidance 7.5
    assert_mostly_close(out[:1], p2p_sample(m.denoiser, traj, nti, c), atol=1e-5)
    # the cross-attention maps at a quarter of the latent side read the 77 token states only
    quarter = blend_map_size(tuple(traj.latents.shape[-2:]))
    source, target = ctrl.store.sums(quarter, 0), ctrl.store.sums(quarter, 1)
    assert source.shape[-1] == TOKENS and torch.allclose(source, target, atol=1e-6)


@pytest.mark.parametrize(("key", "zero_snr"), [("sd2-v", False), ("sdxl-v", False),
                                               ("sd2-v", True)])
def test_v_to_eps_matches_diffusers_ddim_step(key, zero_snr):
    """Our DDIM step on the converted ε equals diffusers' DDIMScheduler.step on the UNet's raw v
    (prediction_type v_prediction, the reference's steps_offset 1 and ᾱ[0] at the end), at the
    first and the last step; with zero-terminal-SNR β as well."""
    from diffusers import DDIMScheduler

    m = variant(key, "v", zero_snr=True) if zero_snr else model(key)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr)
    torch.testing.assert_close(sched.alphas_cumprod.double(), m.alphas_cumprod, atol=1e-6, rtol=0)
    assert (float(m.alphas_cumprod[-1]) == 0.0) == zero_snr
    grid = make_grid(m.alphas_cumprod, 10)
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == list(grid.timesteps)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    c = m.encode_prompt(CAT_PROMPT)
    tokens, pooled = m.family.unpack(c)
    extra = {} if pooled is None else {
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": size_ids(z)}}
    for i in (0, 9):
        t = grid.timesteps[i]
        with torch.no_grad():
            v = m.unet(z, t, encoder_hidden_states=tokens, **extra).sample
            ours = sample_step(grid, i, z, m.denoiser.eps(z, t, c))
        theirs = sched.step(v, t, z).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_zero_snr_grids_never_step_from_alpha_0():
    """ᾱ_T = 0 after the rescale: grids that would start at t = 999 are refused, the default
    ones stop at 981 (ᾱ = 6.9e-5 > 0)."""
    a = zero_terminal_snr(scaled_linear_alphas_cumprod())
    assert float(a[-1]) == 0.0 and float(a[0]) == pytest.approx(0.99915, abs=1e-5)
    assert float(make_grid(a, 50).alphas[0]) == pytest.approx(6.8866e-5, rel=1e-3)
    for steps, kind in ((500, "reference"), (999, "reference"), (1000, "ddim_uniform")):
        with pytest.raises(ValueError, match="ᾱ is 0 .zero terminal SNR"):
            make_grid(a, steps, kind)


def test_pack_unpack_round_trip_and_gradient():
    g = torch.Generator().manual_seed(0)
    tokens, pooled = torch.randn(2, TOKENS, 2048, generator=g), torch.randn(2, 1280, generator=g)
    packed = SDXL.pack(tokens, pooled)
    assert packed.shape == (2, TOKENS + 1, 2048)
    assert torch.equal(packed[:, TOKENS, 1280:], torch.zeros(2, 768))
    t2, p2 = SDXL.unpack(packed)
    assert torch.equal(t2, tokens) and torch.equal(p2, pooled)
    e = packed.clone().requires_grad_(True)
    t3, p3 = SDXL.unpack(e)
    (t3.sum() + 2 * p3.sum()).backward()
    assert torch.equal(e.grad[:, :TOKENS], torch.ones(2, TOKENS, 2048))
    assert torch.equal(e.grad[:, TOKENS, :1280], torch.full((2, 1280), 2.0))
    assert torch.equal(e.grad[:, TOKENS, 1280:], torch.zeros(2, 768))
    for f in (SD1, SD2):
        x = torch.randn(1, TOKENS, f.context_dim)
        assert f.pack(x) is x and f.unpack(x) == (x, None)
    with pytest.raises(ValueError, match="another family"):
        SDXL.unpack(torch.zeros(1, TOKENS, 768))
    with pytest.raises(ValueError, match="pooled text vector"):
        SDXL.pack(tokens)


@pytest.mark.parametrize("key", ["sdxl-eps", "sdxl-v"])
def test_null_text_optimises_the_pooled_row_and_not_its_padding(key):
    """∅ of SDXL is the whole unconditional text conditioning: its token states and its pooled
    vector move; the padding of the pooled row gets no gradient and stays exactly zero."""
    m, _, _, null, _, nti = inverted(key)
    e = nti.embeddings
    assert float((e[:, TOKENS, :1280] - null[:, TOKENS, :1280]).abs().amax(-1).min()) > 1e-4
    assert float((e[:, :TOKENS] - null[:, :TOKENS]).abs().amax()) > 1e-3
    assert torch.equal(e[:, TOKENS, 1280:], torch.zeros(STEPS, 768))


def test_sdxl_size_conditioning_is_the_same_for_every_row():
    """time_ids = (H, W, 0, 0, H, W) in pixels on every row (here 64 × 96 from an 8 × 12 latent),
    text_embeds = each row's pooled vector; rows do not influence each other."""
    m = model("sdxl-eps")
    seen = {}

    def grab(module, args, kwargs):
        seen.update(kwargs["added_cond_kwargs"])

    ctx = torch.cat([m.encode_prompt(""), m.encode_prompt(CAT_PROMPT),
                     m.encode_prompt("a dog sitting next to a mirror")])
    z = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    handle = m.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            batch = m.denoiser.eps(z, 500, ctx)
    finally:
        handle.remove()
    assert torch.equal(seen["time_ids"], torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 3))
    assert torch.equal(seen["text_embeds"], ctx[:, TOKENS, :1280])
    with torch.no_grad():
        rows = torch.cat([m.denoiser.eps(z[k : k + 1], 500, ctx[k : k + 1]) for k in range(3)])
    torch.testing.assert_close(batch, rows, atol=1e-5, rtol=0)


def test_sdxl_tokenizers_must_agree_up_to_eos():
    """SDXL's two tokenizers differ in padding only ("!" vs EOS): a second tokenizer that pads
    differently is fine, one that reads the prompt differently is refused."""
    m = copy.copy(model("sdxl-eps"))  # shares the weights; only tokenizer_2 is replaced

    class Changed:
        def __init__(self, tok, position: str) -> None:
            self.tok, self.position = tok, position
            self.eos_token_id = tok.eos_token_id

        def __call__(self, *args, **kwargs):
            out = self.tok(*args, **kwargs)
            ids = out.input_ids
            if self.position == "padding":
                ids[0, int((ids[0] == self.eos_token_id).nonzero()[0]) + 1 :] = 0  # "!"
            else:
                ids[0, 2] += 1
            return out

    m.tokenizer_2 = Changed(m.tokenizer, "padding")
    assert m.encode_prompt(CAT_PROMPT).shape == (1, TOKENS + 1, 2048)
    m.tokenizer_2 = Changed(m.tokenizer, "word")
    with pytest.raises(ValueError, match="two tokenizers disagree .* at token 2"):
        m.encode_prompt(CAT_PROMPT)


def test_style_diffusion_on_sdxl_learns_token_values_and_pads_the_pooled_row():
    """StyleDiffusion's mapping network produces the values of the 77 token states; the pooled
    row of its value embedding is zero; editing with the values runs."""
    from tiny_models import tiny_clip_vision

    from nti_core.hosts.diffusers.vision import image_tokens
    from nti_core.style import StyleOptions, style_invert

    m, z0, c, null, _, _ = inverted("sdxl-eps")
    traj = ddim_invert(m.denoiser, z0, c, make_grid(m.alphas_cumprod, 2), CAT_PROMPT)
    tokens = image_tokens(tiny_clip_vision(seed=0), load_image(CAT, SIZE))
    values = style_invert(m.denoiser, traj, tokens, null,
                          StyleOptions(inner_steps=2, attention_weight=0.0))
    assert values.shift.shape == values.scale.shape == (2, TOKENS + 1, 2048)
    assert torch.equal(values.shift[:, TOKENS], torch.zeros(2, 2048))
    assert torch.equal(values.scale[:, TOKENS], torch.zeros(2, 2048))
    assert float(values.shift[:, :TOKENS].abs().amax()) > 0
    out = p2p_sample(m.denoiser, traj, plain_null(traj, null), c, values=values)
    assert out.shape == z0.shape and bool(out.isfinite().all())


def test_inversion_file_names_its_family(tmp_path):
    from nti_core.files import load_inversion_all, save_inversion

    m, _, _, _, traj, nti = inverted("sdxl-eps")
    path = save_inversion(tmp_path / "inv", traj, nti, family=m.family)
    again, uncond, _ = load_inversion_all(path, m.denoiser.fingerprint(), family=m.family)
    assert torch.equal(uncond.embeddings, nti.embeddings) and again.prompt == CAT_PROMPT
    with pytest.raises(ValueError, match="made with an SDXL model, but the model connected is SD 2"):
        load_inversion_all(path, family=SD2)
    from safetensors import safe_open

    with safe_open(str(save_inversion(tmp_path / "plain", traj, nti)), "pt") as f:
        assert f.metadata()["family"] == "sdxl"  # read from the embedding's shape


# ------------------------------------------------------------------------------ folders


def _variant_folder(src: Path, dst: Path, **scheduler) -> Path:
    """``src`` with another scheduler config (the weights linked, not copied)."""
    dst.mkdir()
    for child in src.iterdir():
        if child.name != "scheduler":
            (dst / child.name).symlink_to(child)
    cfg = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    (dst / "scheduler").mkdir()
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, **scheduler}))
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Diffusers folders: the tiny sd2-v and sdxl-eps models saved, and scheduler-only variants
    of them (their weights read as the other prediction type; SD 2.x v on zero-terminal-SNR β)."""
    root = tmp_path_factory.mktemp("families")
    out = {key: save_pipeline(model(key), root / key) for key in ("sd2-v", "sdxl-eps")}
    out["sd2-v-as-eps"] = _variant_folder(out["sd2-v"], root / "sd2-v-as-eps",
                                          prediction_type="epsilon")
    out["sdxl-eps-as-v"] = _variant_folder(out["sdxl-eps"], root / "sdxl-eps-as-v",
                                           prediction_type="v_prediction")
    out["sd2-v-zsnr"] = _variant_folder(out["sd2-v"], root / "sd2-v-zsnr",
                                        rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return out


IN_MEMORY = {  # what each folder holds, as a model in memory
    "sd2-v": lambda: model("sd2-v"),
    "sdxl-eps": lambda: model("sdxl-eps"),
    "sd2-v-as-eps": lambda: variant("sd2-v", "eps"),
    "sdxl-eps-as-v": lambda: variant("sdxl-eps", "v"),
    "sd2-v-zsnr": lambda: variant("sd2-v", "v", zero_snr=True),
}


@pytest.mark.parametrize("key", list(IN_MEMORY))
def test_load_model_reads_the_folder_back(folders, key):
    """Family, prediction type, zero-SNR schedule, prompt embeddings and ε of a saved folder are
    those of the model in memory."""
    ours = IN_MEMORY[key]()
    loaded = load_model(folders[key])
    assert loaded.family == ours.family, (loaded.family.label, ours.family.label)
    assert torch.equal(loaded.alphas_cumprod, ours.alphas_cumprod)
    ctx = torch.cat([ours.encode_prompt(""), ours.encode_prompt(CAT_PROMPT)])
    torch.testing.assert_close(torch.cat([loaded.encode_prompt(""),
                                          loaded.encode_prompt(CAT_PROMPT)]), ctx,
                               atol=1e-5, rtol=0)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser.eps(z, 901, ctx), ours.denoiser.eps(z, 901, ctx),
                                   atol=1e-5, rtol=0)
    assert loaded.latent_scale == ours.family.latent_scale


def _folder(root: Path, cls: str, unet: dict | None = None, scheduler: dict | None = None,
            **index) -> Path:
    root.mkdir()
    parts = {p: ["x", "y"] for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                      "text_encoder_2", "tokenizer_2")}
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls, **parts, **index}))
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps(
        {"cross_attention_dim": 768, "in_channels": 4, **(unet or {})}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler or {}))
    return root


def test_unsupported_folders_are_refused_before_diffusers_is_imported(tmp_path):
    cases = {
        "sd3": (_folder(tmp_path / "sd3", "StableDiffusion3Pipeline"), SUPPORTED),
        "flux": (_folder(tmp_path / "flux", "FluxPipeline"), "FluxPipeline"),
        "video": (_folder(tmp_path / "svd", "StableVideoDiffusionPipeline"), SUPPORTED),
        "refiner": (_folder(tmp_path / "refiner", "StableDiffusionXLImg2ImgPipeline",
                            {"cross_attention_dim": 1280}, text_encoder=[None, None]),
                    "StableDiffusionXLImg2ImgPipeline"),
        "no-clip-l": (_folder(tmp_path / "noclip", "StableDiffusionXLPipeline",
                              {"cross_attention_dim": 2048, "addition_embed_type": "text_time"},
                              text_encoder=[None, None]), "has no text_encoder"),
        "inpaint": (_folder(tmp_path / "inpaint", "StableDiffusionPipeline", {"in_channels": 9}),
                    "inpainting"),
        "width": (_folder(tmp_path / "width", "StableDiffusionPipeline",
                          {"cross_attention_dim": 1280}), "1280-wide"),
        "sample": (_folder(tmp_path / "sample", "StableDiffusionPipeline",
                           scheduler={"prediction_type": "sample"}), "predicts 'sample'"),
    }
    code = (
        "import json, sys\n"
        "from nti_core.hosts.diffusers.models import load_model\n"
        "out = {}\n"
        "for name, path in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        load_model(path)\n"
        "        out[name] = 'loaded'\n"
        "    except ValueError as e:\n"
        "        out[name] = str(e)\n"
        "out['imported'] = sorted(m for m in ('diffusers', 'transformers') if m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps({k: str(v[0]) for k, v in cases.items()})],
        cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    messages = json.loads(done.stdout)
    assert messages.pop("imported") == []
    for name, (_, expected) in cases.items():
        assert expected in messages[name], (name, messages[name])
        assert "SD 1.x, SD 2.x and SDXL" in messages[name], (name, messages[name])


@pytest.mark.parametrize(("keys", "family"), [
    ({"conditioner.embedders.1.model.ln_final.weight": (1280,)}, "SDXL"),
    ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "SD 2.x"),
    ({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)},
     "SDXL"),
])
def test_sd2_and_sdxl_single_files_are_refused_with_how_to_convert(tmp_path, keys, family):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(ValueError) as info:
        check_model_path(path)
    assert f"single-file {family} checkpoint" in str(info.value)
    assert "convert it to a diffusers folder" in str(info.value)


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("key", ["sd2-v", "sdxl-eps"])
def test_cli_edit_on_a_folder(folders, key, tmp_path, caplog):
    """``python -m nti_core edit`` on a saved folder: the family is reported, the images are
    written, and the reported null-text reconstruction error is finite and below plain DDIM's
    (the same photo, steps and guidance 7.5, with the model in memory that the folder holds).
    Measured on the whole 3:4 photo at 48×64 px, 4 steps: SD2-v DDIM 0.0348 / null-text 0.00831,
    SDXL-ε 0.0175 / 0.00108."""
    from nti_core.app import main

    out = tmp_path / "edit"
    argv = ["edit", "--model", str(folders[key]), "--image", str(CAT), "--source", CAT_PROMPT,
            "--target", "a dog sitting next to a mirror", "--steps", "4", "--size", "64",
            "--method", "null-text", "--out", str(out)]
    with caplog.at_level("INFO", logger="nti_core"):
        assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["family"] == model(key).family.key
    assert f"model: {model(key).family.label}" in caplog.text
    for name in ("reconstruction.png", "edit_1.png", "contact_sheet.png", "attention_source.png"):
        assert (out / name).is_file(), name
    m = model(key)
    z0 = m.encode_image(load_image(CAT, 64, crop=False))  # the whole photo, as the CLI
    c = m.encode_prompt(CAT_PROMPT)
    traj = ddim_invert(m.denoiser, z0, c, make_grid(m.alphas_cumprod, 4), CAT_PROMPT)
    ddim = float(F.mse_loss(p2p_sample(m.denoiser, traj, plain_null(traj, m.encode_prompt("")), c),
                            z0))
    ours = report["reconstruction"]["latent_mse"]
    print(f"\nCLI {key}: latent MSE DDIM {ddim:.3g}, null-text {ours:.3g}")
    assert math.isfinite(ours) and ours < ddim / 1.5
