"""Progress with an ETA for long work (evaluation, prediction): tqdm's bar on a terminal;
otherwise, once the work has taken ``min_interval`` seconds, a plain line every tenth of the
way (at most one a ``min_interval``) and at the end, so that logs stay readable."""

from __future__ import annotations

import math
import sys
import time


def fmt_time(s: float) -> str:
    """Seconds as ``1d02h``, ``3h04m`` or ``5m06s``."""
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressMeter:
    """``with ProgressMeter(total, desc) as p: ... p.update(n)``: ``total`` items (images) in all;
    ``enabled=False`` shows nothing (processes other than the first)."""

    def __init__(self, total: int, desc: str, *, unit: str = "img", enabled: bool = True,
                 stream=None, min_interval: float = 10.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled, self.min_interval = enabled and total > 0, min_interval
        self._bar, self.done, self._next_mark, self._last = None, 0, 0.1, 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.stream,
                             dynamic_ncols=True, leave=False)
        return self

    def update(self, n: int) -> None:
        """``n`` more items done (the count stops at ``total``: a padded last batch)."""
        n = min(n, self.total - self.done)
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        fraction = self.done / max(self.total, 1)
        # Work shorter than min_interval prints nothing; then a line per tenth, the last always.
        if not self.enabled or now - self._t0 < self.min_interval \
                or (fraction < 1.0 and (fraction < self._next_mark or now - self._last < self.min_interval)):
            return
        self._next_mark, self._last = (math.floor(fraction * 10 + 1e-9) + 1) / 10, now
        elapsed = now - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * fraction:.0f}%)  "
              f"{rate:.1f} {self.unit}/s  ETA {fmt_time(eta)}", file=self.stream, flush=True)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
