"""NTIAttentionEditPlan: source and target prompts plus Prompt-to-Prompt options → an edit plan.

The inputs are ``nti_core.plan_spec.FIELDS``. ComfyUI checks the ranges and options of the fields
valid on their own; ``validate_inputs`` checks the others together when the prompt is queued (the
same checks run again at execution, for values that arrive through links).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from comfy_api.latest import io

from ..nti_core.plan_spec import CHECKED_TOGETHER, FIELDS, Field, check_words
from ..nti_core.plan_spec import plan_from_fields as _plan
from . import types
from .common import CATEGORY, encode_prompt, family_tokenizer, intermediate


def plan_input(f: Field) -> Any:
    """The widget of one plan field."""
    if f.kind == "fraction":
        return io.Float.Input(f.name, default=f.default, min=0.0, max=1.0, step=0.01,
                              tooltip=f.help)
    if f.kind == "choice":
        return io.Combo.Input(f.name, options=list(f.options), default=f.default, tooltip=f.help)
    return io.String.Input(f.name, default=f.default, multiline=f.kind in ("prompt", "lines"),
                           tooltip=f.help)


def checked_plan(values: dict[str, Any], clip: Any = None):
    """The P2PSpec of the widget values, its words found with the CLIP's family tokenizer (the
    SD 1.x one before a CLIP is known: every family here shares its vocabulary)."""
    spec = _plan(values)
    check_words(spec, family_tokenizer(clip))
    return spec


def _validate(**values: Any) -> bool | str:
    if any(values.get(name) is None for name in CHECKED_TOGETHER):
        return True  # a linked value is known only at execution, which checks again
    try:
        checked_plan({k: v for k, v in values.items() if v is not None})
    except ValueError as e:
        return str(e)
    return True


class NTIAttentionEditPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NTIAttentionEditPlan",
            display_name="Attention Edit Plan (NTI)",
            category=CATEGORY,
            description="Prompt-to-Prompt edit: which prompts, how the source's attention is "
            "injected, reweighted words and the local blend. Checked when the prompt is queued.",
            inputs=[io.Clip.Input("clip", tooltip="The CLIP used for DDIM Invert (NTI): encodes "
                                  "the prompts."),
                    *(plan_input(f) for f in FIELDS)],
            outputs=[
                types.EditPlanType.Output("plan", display_name="plan",
                                          tooltip="The checked edit with CLIP's target "
                                          "embeddings, for P2P Sample (NTI)."),
            ],
        )

    @classmethod
    def execute(cls, clip, **values: Any) -> io.NodeOutput:
        spec = checked_plan(values, clip)
        tok = family_tokenizer(clip)
        source = encode_prompt(clip, spec.source, tok, "source prompt")
        targets = torch.cat([encode_prompt(clip, t, tok, "target prompt") for t in spec.targets])
        plan = types.EditPlan(spec, targets.to(intermediate()), source.to(intermediate()))
        return io.NodeOutput(plan)


def _validate_inputs(cls: Any, **values: Any) -> bool | str:
    return _validate(**values)


# ComfyUI hands validate_inputs the inputs its signature names, skips its own range and option
# checks for those, and repeats a refused plan's message once per named input: the signature
# names CHECKED_TOGETHER only.
_P = inspect.Parameter
_validate_inputs.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_P("cls", _P.POSITIONAL_OR_KEYWORD)]
    + [_P(name, _P.POSITIONAL_OR_KEYWORD, default=None) for name in CHECKED_TOGETHER])
NTIAttentionEditPlan.validate_inputs = classmethod(_validate_inputs)  # type: ignore[method-assign,assignment]
