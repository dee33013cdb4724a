"""Command line: ``python -m nti_core edit …`` on a user's SD 1.x, SD 2.x or SDXL model, ``… demo``
on the built-in demo model (trained by this project on photos that ship with it; no download).

Both run the pipeline of ``nti_core.editing``. Progress goes to stderr: a numbered line when each
phase starts and ends (also when the output is piped or logged), a progress bar on a terminal.
Errors print as one line (``error: …``) with exit status 2, before any long computation;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .args import parser
from .phases import quiet_import_noise

log = logging.getLogger("nti_core")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    quiet_import_noise()
    try:
        if a.command == "demo":
            from .demo import run
        else:
            from .edit import run
        report = run(a)
    except (ValueError, FileNotFoundError, NotImplementedError, OSError) as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {Path(a.out).resolve()} (report.json)")
    log.debug("%s", report)
    return 0


__all__ = ["main", "parser"]
