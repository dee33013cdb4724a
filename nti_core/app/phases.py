"""Progress on stderr: numbered phases, a bar on a terminal, a line per tenth without one."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from ..progress import Progress

log = logging.getLogger("nti_core")


class Phases:
    """Numbered phases on stderr: a line when each starts and ends, a bar that stays on a
    terminal, and without a terminal a line at every tenth of a long phase."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    @contextlib.contextmanager
    def __call__(self, name: str, units: int = 0) -> Iterator[Progress]:
        self.done += 1
        tag = f"[{self.done}/{self.total}] {name}"
        log.info("%s …", tag)
        start = time.perf_counter()
        bar = None
        if units and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=units, desc=tag, leave=True, file=sys.stderr)
        count, report_at = 0, 0.1

        def tick(n: int = 1) -> None:
            nonlocal count, report_at
            count += n
            if bar is not None:
                bar.update(n)
                return
            while units and count < units and count >= report_at * units:
                log.info("%s: %d/%d (%.0f s)", tag, count, units, time.perf_counter() - start)
                report_at += 0.1

        try:
            yield tick
        finally:
            if bar is not None:
                bar.close()
        log.info("%s: done in %.1f s", tag, time.perf_counter() - start)


def quiet_import_noise() -> None:
    """transformers warns, while diffusers imports, that image processors fall back to PIL when
    torchvision is absent: nothing here uses them. Other transformers warnings stay."""
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda r: "requires torchvision" not in r.getMessage())
