"""Write the generated parts of the nodes' help pages (web/docs/<NodeId>.md) from the tables they
document: the edit plan's fields (nti_core/plan_spec.py) and the inversion methods
(nti_core/methods.py). tests/test_help_pages.py fails when a page is stale.

    python tools/help_pages.py          # rewrite the blocks between the markers
    python tools/help_pages.py --check  # exit 1 if a page differs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nti_core.methods import METHODS, offered_by  # noqa: E402
from nti_core.plan_spec import markdown  # noqa: E402

DOCS = ROOT / "web" / "docs"


def methods_markdown(node: str) -> str:
    """The methods a node offers, one line each, from the table."""
    lines = []
    for name in offered_by(node):
        m = METHODS[name]
        needs = [w for w, on in (("optimises (autograd, minutes)", m.optimises),
                                 ("takes an attention loss", m.attention_loss),
                                 ("needs an image encoder", m.needs_encoder)) if on]
        lines.append(f"- **{name}**: {m.summary}" + (f" — {', '.join(needs)}" if needs else "")
                     + ".")
    return "\n".join(lines)


BLOCKS = {  # page → {block name: its text}
    "NTIAttentionEditPlan.md": {"plan-fields": markdown()},
    "NTINullTextOptimize.md": {"methods": methods_markdown("NTINullTextOptimize")},
}


def render(text: str, blocks: dict[str, str]) -> str:
    """``text`` with each block's markers enclosing its generated body (markers must exist)."""
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n)[\s\S]*?(<!-- {name}:end -->)")
        if not pattern.search(text):
            raise ValueError(f"no <!-- {name}:begin --> … <!-- {name}:end --> markers")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def stale() -> list[str]:
    """The pages whose generated blocks are not what the tables say."""
    out = []
    for page, blocks in BLOCKS.items():
        text = (DOCS / page).read_text()
        if render(text, blocks) != text:
            out.append(page)
    return out


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = stale()
        print("stale: " + ", ".join(bad) if bad else "help pages are current")
        return 1 if bad else 0
    for page, blocks in BLOCKS.items():
        path = DOCS / page
        path.write_text(render(path.read_text(), blocks))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
