"""The command line's arguments: the edit plan's from ``nti_core.plan_spec``, the methods from
``nti_core.methods``, and the checks of the numbers, each named by its option."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..attention.plan import P2PSpec
from ..methods import DEFAULT, METHODS, check_request
from ..plan_spec import FIELDS, PER_WORD, plan_from_fields
from ..precision import PRECISIONS
from ..schedule import GRID_KINDS
from ..sweep import EXAMPLE, SWEEPABLE


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except where there is none (required options, unset ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default in (None, [], "", False):
            return action.help or ""
        return super()._get_help_string(action) or ""


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """One option per edit-plan field; the prompts are required, the targets repeatable."""
    for f in FIELDS:
        kw: dict[str, Any] = {"dest": f.name, "help": f.help}
        if f.kind == "prompt":
            kw["required"] = True
        elif f.kind == "lines":
            kw.update(action="append", required=True)
        elif f.kind == "fraction":
            kw.update(type=float, default=f.default)
        elif f.kind == "choice":
            kw.update(choices=f.options, default=f.default)
        else:
            kw["default"] = f.default
        p.add_argument(f.cli, **kw)


def plan_fields(a: argparse.Namespace) -> dict[str, Any]:
    """The edit-plan fields' values of the parsed options (repeated --target, one per line)."""
    values = {f.name: getattr(a, f.name) for f in FIELDS}
    lines = next(f.name for f in FIELDS if f.kind == "lines")
    values[lines] = "\n".join(values[lines])
    return values


def plan_from_args(a: argparse.Namespace) -> P2PSpec:
    """The checked plan of the parsed options (the targets of repeated --target, one each)."""
    return plan_from_fields(plan_fields(a))


def sweep_axes(a: argparse.Namespace) -> list[str]:
    """--sweep's axes as (rows, columns): one alone is the columns of a single row."""
    return list(a.sweep) if len(a.sweep) != 1 else ["", a.sweep[0]]


def check_args(a: argparse.Namespace) -> None:
    """Numeric options and the method's needs, checked with the option's own name before
    anything loads."""
    if a.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {a.steps}")
    if a.size % 8 or a.size < 64:
        raise ValueError(f"--size must be a multiple of 8 and at least 64, got {a.size}")
    if a.command != "edit":
        return
    for name in ("guidance", "early_stop", "attention_loss", "style_attention_loss"):
        if not math.isfinite(getattr(a, name)):  # argparse's float() takes nan and inf
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got "
                             f"{getattr(a, name)}")
    if a.guidance <= 0:
        raise ValueError(f"--guidance must be positive, got {a.guidance}")
    for name in ("inner_steps", "style_inner_steps"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got "
                             f"{getattr(a, name)}")
    for name in ("early_stop", "attention_loss", "style_attention_loss"):
        if getattr(a, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(a, name)}")
    if not 0.0 <= a.value_end <= 1.0:
        raise ValueError(f"--value-end must be a fraction in [0, 1], got {a.value_end}")
    if METHODS[a.method].needs_encoder and not a.image_encoder:
        raise ValueError(f"--method {a.method} needs --image-encoder (a transformers CLIP "
                         "vision folder, e.g. openai/clip-vit-base-patch16)")
    weight = a.style_attention_loss if METHODS[a.method].makes_values else a.attention_loss
    check_request(a.method, attention_weight=weight, direct=a.direct)


def parser() -> argparse.ArgumentParser:
    from . import __doc__ as about

    fmt = _Help
    p = argparse.ArgumentParser(prog="python -m nti_core", description=(about or "").split("\n\n")[0],
                                formatter_class=fmt)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="invert → null-text → edits on the built-in demo model (no download)",
                       description="Invert the cat photo of the Null-text paper into the demo "
                       "model, compare the inversion methods' reconstructions at guidance 7.5, "
                       "run the edits the demo model can express, and write PNGs, "
                       "contact_sheet.png and report.json.")
    d.add_argument("--out", default="nti_out/demo", help="output folder")
    d.add_argument("--steps", type=int, default=50, help="DDIM steps")
    d.add_argument("--size", type=int, default=256, help="square image side in pixels")

    e = sub.add_parser("edit", formatter_class=fmt,
                       help="edit a photo with a local SD 1.x, SD 2.x or SDXL model",
                       description="Invert a photo into an SD 1.x, SD 2.x or SDXL model (ε- or "
                       "v-prediction), make the null-text embeddings and sample "
                       "Prompt-to-Prompt edits; writes the reconstruction, one PNG per target, "
                       "contact_sheet.png and report.json (with the reconstruction's latent MSE "
                       "and PSNR).")
    e.add_argument("--model", required=True,
                   help="a diffusers folder of SD 1.x, SD 2.x or SDXL (StableDiffusionPipeline / "
                        "StableDiffusionXLPipeline), or a single-file SD 1.x .safetensors")
    e.add_argument("--image", required=True,
                   help="the photo (JPEG turned upright by its EXIF orientation; RGBA loses its "
                        "alpha, greyscale, palette and 16-bit PNGs are read as RGB)")
    add_plan_arguments(e)
    e.add_argument("--mask", default=None,
                   help="your own region: an image of the photo's size, white = may change "
                        "(brightness × opacity), resized (and with --crop cropped) as the "
                        "photo; outside it the edits "
                        "keep the reconstruction from --blend-start on (with --blend-words: "
                        "only where both allow)")
    e.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2",
                   help=f"also write sweep.png: the first target's edit over these values of a "
                        f"plan field (e.g. {EXAMPLE}; {' / '.join(PER_WORD)} as "
                        f"word:v1,v2), one P2P sampling per cell from the same inversion; give "
                        f"it twice for rows × columns. Fields: {', '.join(SWEEPABLE)}")
    e.add_argument("--method", choices=tuple(METHODS), default=DEFAULT,
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    e.add_argument("--direct", action="store_true",
                   help="with --method styled: also keep the source row on the pivot (Direct "
                        "Inversion)")
    e.add_argument("--no-attention-maps", action="store_true",
                   help="skip the attention-map PNGs (sampling then keeps only the maps "
                        "LocalBlend reads)")
    e.add_argument("--image-encoder", default=None,
                   help="StyleDiffusion's E: a transformers CLIP vision folder (the paper: "
                        "openai/clip-vit-base-patch16)")
    e.add_argument("--style-variant", choices=("official", "paper"), default="official",
                   help="mapping network: the official code's scale and shift of the prompt "
                        "embedding, or the paper's Table 1 (values from the image alone)")
    e.add_argument("--style-inner-steps", type=int, default=100,
                   help="StyleDiffusion's K: step i runs at most ⌈K·e^(−0.1·i)⌉ iterations")
    e.add_argument("--style-attention-loss", type=float, default=1.0,
                   help="λ of StyleDiffusion's attention loss (the official code: 1)")
    e.add_argument("--value-end", type=float, default=0.5,
                   help="StyleDiffusion τ_v: fraction of the first steps where the targets read "
                        "the learned values (then their own prompt)")
    e.add_argument("--steps", type=int, default=50,
                   help="DDIM steps (StyleDiffusion's official code runs 30)")
    e.add_argument("--grid", choices=GRID_KINDS, default="reference",
                   help="reference: the papers' 981…1 ending at ᾱ[0]; ddim_uniform: ComfyUI's")
    e.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    e.add_argument("--inner-steps", type=int, default=10, help="null-text Adam steps per DDIM step")
    e.add_argument("--early-stop", type=float, default=1e-5,
                   help="null-text early stop: loss < this + step·2e-5")
    e.add_argument("--attention-loss", type=float, default=0.0,
                   help="λ of the attention loss added to null-text optimisation (StyleDiffusion "
                        "§3.2); 0 = the reference algorithm")
    e.add_argument("--size", type=int, default=512,
                   help="the longer side of the image in pixels; the shorter follows the photo's "
                        "aspect ratio, rounded to a multiple of 8 (with --crop: the square's "
                        "side)")
    e.add_argument("--crop", action="store_true",
                   help="edit the photo's centre square (size × size) instead of the whole photo")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, mps")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="the model's dtype: UNet, text encoders and VAE load and compute in it "
                        "(SDXL's VAE stays fp32 under fp16)")
    e.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="what the optimisation computes the UNet in: model = the --dtype (∅, "
                        "Adam and the loss stay fp32); fp32 = always fp32; auto = model where "
                        "measured as exact as fp32 (docs/precision.md)")
    e.add_argument("--out", default="nti_out/edit", help="output folder")
    e.add_argument("--save-inversion", default=None, metavar="FILE",
                   help="also write the inversion (pivot, ∅, StyleDiffusion's values) to FILE "
                        "(.safetensors appended), the format of Save Inversion (NTI); an "
                        "existing file is never replaced")
    e.add_argument("--load-inversion", default=None, metavar="FILE",
                   help="edit from an inversion saved by --save-inversion or Save Inversion "
                        "(NTI) instead of inverting: its steps, grid and ∅ are used (--method "
                        "and the optimisation's options are not); it must be of this --model, "
                        "--image, --size and --source")
    return p
