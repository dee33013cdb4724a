"""GPU memory of each stage, computed here without a GPU: stage × dtype × family.

    python bench/memory.py [--families sd1,sdxl] [--dtypes fp16,bf16,fp32] [--out FILE.json]

The full-size UNets (bench/unets.py: SD 1.5 at 512², SDXL at 1024²; ``--families sd2`` adds
SD 2.1 at 768²) run the engine's own code — the diffusers host's ``DiffusersDenoiser``, the
null-text loss, ``MapRecorder``, the P2P controller with LocalBlend — on *fake* tensors of a
CUDA device (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no data), so the
SDXL UNet at 1024² costs seconds and no memory. Attention runs as a GPU runs it: flash attention
in half precision, memory-efficient attention in fp32 (what each keeps for the backward: q, k,
v, the output and the log-sum-exp; their backward is modelled by its gradient buffers).

Per stage it reports the live tensors' peak above the weights (a dispatch-mode tracker follows
every storage from allocation to release, saved tensors included) and, for the optimisation
stages, what the iteration keeps for its backward (``saved_tensors_hooks``, each storage once):

- ``inversion``: one conditional UNet pass (no grad), what DDIM inversion runs per step;
- ``null-text``: one iteration of null-text-fast / null-text: ε_c (no grad), ε_∅ with grad,
  the DDIM step, the latent MSE, the backward to ∅;
- ``null-text + ckpt``: the same with gradient checkpointing of the UNet's blocks;
- ``+ attention loss``: null-text with the attention loss (maps at a quarter of the latent
  side kept with their graph);
- ``P2P edit``: one sampling step of one edit (source + target, each with ∅: 4 rows) with
  cross/self-attention injection and LocalBlend;
- ``VAE decode``: decoding the reconstruction and the edit (SD's VAE architecture).

Totals add the weights and what the stage keeps across steps (the trajectory, ∅, Adam state).
Not counted: the CUDA context and cuBLAS/cuDNN workspaces (~0.3–0.5 GB), the allocator's
fragmentation, ComfyUI's text encoders and VAE when it keeps them loaded. The last column is
ComfyUI with ``precision fp32`` on the half model: its half weights, the per-call fp32 weight
copies the backward keeps, and fp32 activations. Computed on the CPU: a GPU's ``torch.cuda.max_memory_allocated``
(bench/gpu_check.py) is the measurement that confirms or corrects these numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS_GB = {"sd1": 6.0, "sdxl": 14.0}  # issue 17: an 8 GB and a 16 GB card
GB = 1e9
# The fake tensors' device. Their bytes are what a GPU holds; "cpu" because autograd's engine
# asks a real CUDA runtime about a "cuda" device when it runs the backward.
DEVICE = "cpu"


# ------------------------------------------------------------------------- accounting
class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive now and at their peak, for tensors made inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.now = self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.now

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.refs:
            self.refs[key], self.size[key] = 0, storage.nbytes()
            self.now += self.size[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.now -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@contextlib.contextmanager
def saved_bytes(live: LiveBytes):
    """Bytes autograd keeps for the backward, each storage counted once and only storages made
    in ``live``'s stage (not the weights, which stay anyway): yields a dict whose 'bytes' is
    filled in as the graph is built."""
    seen: set[int] = set()
    out = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in seen and key in live.refs:
            seen.add(key)
            out["bytes"] += live.size[key]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


class GPUAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as a GPU runs it: the fused flash kernel, which keeps
    q, k, v, the output and the log-sum-exp for its backward (on fake CPU tensors PyTorch would
    pick its math kernel, which keeps the whole probability matrix)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------- the models
def fake_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every parameter and buffer of a meta-device module as a fake CUDA tensor of ``dtype``
    (buffers keep theirs)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=dtype, device=DEVICE), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=DEVICE)
    return module


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def meta_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):  # SD 1.x / 2.x / XL share this architecture
        return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                             down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)


# ------------------------------------------------------------------------- the stages
def measure(family: str, dtype: torch.dtype, steps: int = 50) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from unets import SIDES, meta_unet

    from nti_core.attention.plan import P2PSpec
    from nti_core.denoiser import Rows
    from nti_core.family import FAMILIES
    from nti_core.hosts.diffusers import DiffusersDenoiser
    from nti_core.null_text import UNCOND_ROW, attention_loss, attention_recorder
    from nti_core.schedule import ddim_step, make_grid, scaled_linear_alphas_cumprod
    from nti_core.tokenizer import sd1_clip_tokenizer
    from nti_core.trajectory import Trajectory

    fam = FAMILIES[family]
    side = SIDES[family]
    hw = (side // 8, side // 8)
    rows_l = fam.embedding_rows
    grid = make_grid(scaled_linear_alphas_cumprod(), steps)
    i, t = 10, grid.timesteps[10]
    levels = grid.level(i), grid.level(i + 1)  # floats, read before any tensor is fake
    unet, vae = meta_unet(family), meta_vae()
    out: dict = {"family": family, "side": side, "dtype": str(dtype).removeprefix("torch.")}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:  # fake weights and inputs; the engine then runs outside the mode, so its small
        fake_module(unet, dtype)  # bookkeeping tensors (row labels, step tables) stay real
        fake_module(vae, dtype)
        z = torch.randn(1, 4, *hw, device=DEVICE)
        cond = torch.randn(1, rows_l, fam.context_dim, device=DEVICE)
        null = torch.randn(1, rows_l, fam.context_dim, device=DEVICE)
        target = torch.randn(1, 4, *hw, device=DEVICE)
        latents2 = torch.randn(2, 4, *hw, device=DEVICE, dtype=dtype)
    den = DiffusersDenoiser(unet, scaled_linear_alphas_cumprod(), fam)
    out["weights"] = param_bytes(unet)
    out["vae_weights"] = param_bytes(vae)

    def stage(fn) -> dict:
        live = LiveBytes()
        with GPUAttention(), live, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = fn(live)
        return {"peak": live.peak, "saved": saved}

    def inversion(live):
        with torch.no_grad():
            den.eps(z, t, cond, step=i)
        return 0

    def null_text(live, recorder=None, maps_target=None):
        with torch.no_grad():
            eps_c = den.eps(z, t, cond, step=i)
        u = null.clone().requires_grad_(True)
        with saved_bytes(live) as kept:
            if recorder is None:
                eps_u = den.eps(z, t, u, step=i)
            else:
                eps_u = den.eps(z, t, u, rows=UNCOND_ROW, step=i, controller=recorder)
            loss = F.mse_loss(ddim_step(z, eps_u + 7.5 * (eps_c - eps_u), *levels), target)
            if recorder is not None:
                loss = loss + attention_loss(recorder.step_maps(i), maps_target)
        loss.backward()
        return kept["bytes"]

    out["inversion"] = stage(inversion)
    out["null-text"] = stage(null_text)
    unet.enable_gradient_checkpointing()
    out["null-text + ckpt"] = stage(null_text)
    unet.disable_gradient_checkpointing()

    fake_traj = Trajectory(torch.zeros(steps + 1, 4, *hw), grid, "p", torch.zeros(1, rows_l,
                           fam.context_dim), torch.zeros(2, dtype=torch.float64),
                           maps=torch.zeros(steps, 1, 1, 1, 1))
    recorder = attention_recorder(fake_traj, branch=False)
    with torch.no_grad(), GPUAttention():  # the recorded maps' shape, for a stand-in target
        den.eps(z, t, null, rows=UNCOND_ROW, step=i, controller=recorder)
    maps = recorder.step_maps(i)
    recorder.maps.clear()
    maps_target = torch.zeros_like(maps, dtype=torch.float32)
    out["+ attention loss"] = stage(lambda live: null_text(live, recorder, maps_target))
    out["loss_maps"] = list(maps.shape)

    spec = P2PSpec("a cat sitting next to a mirror", ("a tiger sitting next to a mirror",),
                   mode="replace", blend_words=("cat", "tiger"))
    ctrl = spec.build(sd1_clip_tokenizer(), steps, latent_hw=hw)
    rows = Rows.cfg(2)

    def p2p(live):
        with torch.no_grad():
            ctx = torch.cat([null.expand(2, -1, -1), cond.expand(2, -1, -1)])
            eps = den.eps(torch.cat([z] * 4), t, ctx, rows=rows, step=i, controller=ctrl)
            zz = ddim_step(z.expand(2, -1, -1, -1), eps[:2] + 7.5 * (eps[2:] - eps[:2]), *levels)
            ctrl.after_step(max(i, int(0.2 * steps)), zz)
        return 0

    out["P2P edit"] = stage(p2p)
    out["p2p_store_sizes"] = [list(s) for s in ctrl.store.resolutions()]

    def decode(live):
        with torch.no_grad():
            vae.decode(latents2)
        return 0

    out["VAE decode"] = stage(decode)
    d = torch.finfo(torch.float32).bits // 8
    out["kept"] = {  # what stays on the device across steps, fp32
        "trajectory": (steps + 1) * 4 * hw[0] * hw[1] * d,
        "uncond": steps * rows_l * fam.context_dim * d,
        "adam": 2 * rows_l * fam.context_dim * d,
    }
    out["fp32_weight_copies"] = (sum(p.numel() for p in unet.parameters()) * 4
                                 if dtype != torch.float32 else 0)
    return out


STAGES = ("inversion", "null-text", "null-text + ckpt", "+ attention loss", "P2P edit",
          "VAE decode")


def totals(r: dict) -> dict:
    """Peak device memory per stage: weights (UNet; the VAE for decoding) + kept + stage peak."""
    kept = sum(r["kept"].values())
    out = {}
    for s in STAGES:
        base = r["vae_weights"] if s == "VAE decode" else r["weights"] + kept
        out[s] = base + r[s]["peak"]
    return out


def fp32_on_half(r: dict, results: list[dict], stage: str) -> float | None:
    """ComfyUI with precision fp32 on this half model: its half weights, the per-call fp32
    copies the backward keeps, and the fp32 run's activations."""
    full = [x for x in results if x["family"] == r["family"] and x["dtype"] == "float32"]
    if not full or not r["fp32_weight_copies"]:
        return None
    kept = sum(r["kept"].values())
    return r["weights"] + r["fp32_weight_copies"] + kept + full[0][stage]["peak"]


def table(results: list[dict]) -> str:
    lines = ["| family | dtype | stage | weights GB | kept for backward GB | stage peak GB | "
             "total GB | precision fp32 on ComfyUI GB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        tot = totals(r)
        for s in STAGES:
            saved = r[s]["saved"]
            w = r["vae_weights"] if s == "VAE decode" else r["weights"]
            cast = fp32_on_half(r, results, s) if saved else None
            lines.append(f"| {r['family']} {r['side']}² | {r['dtype']} | {s} | {w / GB:.2f} | "
                         f"{saved / GB:.2f} | " if saved else
                         f"| {r['family']} {r['side']}² | {r['dtype']} | {s} | {w / GB:.2f} | — | ")
            lines[-1] += (f"{r[s]['peak'] / GB:.2f} | {tot[s] / GB:.2f} | "
                          f"{'—' if cast is None else f'{cast / GB:.2f}'} |")
    return "\n".join(lines)


def verdicts(results: list[dict]) -> list[str]:
    """The issue's targets: null-text-fast + one edit (+ decode) at fp16, with and without
    checkpointing."""
    lines = []
    for r in results:
        if r["dtype"] != "float16" or r["family"] not in TARGETS_GB:
            continue
        tot = totals(r)
        target = TARGETS_GB[r["family"]]
        for opt in ("null-text", "null-text + ckpt"):
            peak = max(tot[opt], tot["P2P edit"], tot["inversion"])
            ok = "meets" if peak <= target * GB else "misses"
            lines.append(f"{r['family']} {r['side']}² fp16, {opt} + one edit: peak "
                         f"{peak / GB:.2f} GB — {ok} the {target:g} GB target")
    return lines


def coefficients(results: list[dict]) -> dict:
    """Saved elements per latent pixel (nti_core.memory's SAVED_PER_PIXEL and
    CHECKPOINTED_PER_PIXEL: one row, per byte of the dtype), from the half-precision runs;
    the checkpointed figure is the stage's live peak, what the recomputation needs at once."""
    out: dict = {}
    for r in results:
        if r["dtype"] not in ("float16", "bfloat16"):
            continue
        px = (r["side"] // 8) ** 2
        out[r["family"]] = {
            "saved_per_pixel": round(r["null-text"]["saved"] / 2 / px, -2),
            "checkpointed_per_pixel": round(r["null-text + ckpt"]["peak"] / 2 / px, -2),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="sd1,sdxl")
    p.add_argument("--dtypes", default="fp16,bf16,fp32")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    results = [measure(f, DTYPES[d], a.steps) for f in a.families.split(",")
               for d in a.dtypes.split(",")]
    print(table(results))
    print()
    print("\n".join(verdicts(results)))
    coef = coefficients(results)
    print(f"\nper latent pixel (nti_core/memory.py): {coef}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"results": results, "coefficients": coef},
                                          indent=2, default=str))


if __name__ == "__main__":
    main()
