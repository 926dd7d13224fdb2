"""Progress for long work: a tqdm bar on a terminal, plain lines with elapsed time and ETA everywhere else.

Under nohup, a batch scheduler or a pipe a bar prints nothing useful for minutes; a line per epoch (or per run, per
quarter of a decode) does. MEDCL_PROGRESS overrides the choice: `bar`, `lines` or `off`.
"""
from __future__ import annotations

import os
import sys
import time

MODES = ("bar", "lines", "off")


def progress_mode(progress=True) -> str:
    """'bar' | 'lines' | 'off' from a library `progress` argument (bool or one of those) and MEDCL_PROGRESS."""
    if progress is False or progress is None or progress == "off":
        return "off"
    if progress in ("bar", "lines"):
        return progress
    env = os.environ.get("MEDCL_PROGRESS", "").strip().lower()
    if env in MODES:
        return env
    if env in ("1", "0"):  # older spelling: 1 = show progress even when not on a terminal
        return "off" if env == "0" else "lines"
    return "bar" if sys.stderr.isatty() else "lines"


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_text(done: float, total: float, elapsed: float) -> str:
    left = elapsed / done * (total - done) if done > 0 else float("nan")
    return f"elapsed {duration(elapsed)}, ETA {duration(left) if left == left else '?'}"


class Progress:
    """One unit of work counted to `total`. Bar mode: tqdm. Lines mode: a line on stderr every `line_every` units
    (None: never; the caller prints its own lines) and at the end."""

    def __init__(self, total: int, desc: str, progress=True, unit: str = "it", initial: int = 0,
                 line_every: int | None = 1, min_total: int = 0):
        self.mode = progress_mode(progress) if total >= min_total else "off"
        self.total, self.desc, self.n, self.line_every = total, desc, initial, line_every
        self.start, self.start_n, self.postfix = time.perf_counter(), initial, {}
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)

    def set_postfix(self, **kw):
        self.postfix = kw
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def update(self, n: int = 1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines" and self.line_every and (self.n // self.line_every > (self.n - n) // self.line_every
                                                           or self.n >= self.total):  # crossed a multiple, or done
            info = ", ".join(f"{k} {v}" for k, v in self.postfix.items())
            elapsed = time.perf_counter() - self.start
            print(f"{self.desc}: {self.n}/{self.total}{' (' + info + ')' if info else ''}, "
                  f"{eta_text(self.n - self.start_n, self.total - self.start_n, elapsed)}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Phases:
    """Wall time per phase of a command, printed at its end ("read scans 3s, encode 20s, ..."): where time goes."""

    def __init__(self):
        self.t, self.times = time.perf_counter(), {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.t
        self.t = now

    def __str__(self):
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.times.items())
