"""Progress you can follow during `critlib run`: the phases' time estimate, and the long loops' counts from
inside a phase.

The kernel runs a notebook in another process, so `critlib run` sets CRITLIB_PROGRESS to a file of its own
(`Follower`); critlib's long loops (`Bar`, a tqdm that also reports; `track` for loops without a bar) write
"<label> i/n" to it through `report`, and the Follower's thread shows it: one line rewritten in place on a
terminal, elsewhere a line at most every 30 s. Without the variable (a notebook run any other way, the
library) `report` does nothing; it never prints and never touches a result.

The estimate (`Estimate`) takes each phase's time from the last run in the same folder with the same
parameters, else a default per phase (the default model's `make run` on a 2-core CPU, BENCHMARKS.md) scaled
by the data size, then by the pace of the phases done so far.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

ENV = "CRITLIB_PROGRESS"
WRITE_EVERY = 0.25  # seconds between writes of one process (the last count of a loop is always written)
_last_write = 0.0


def report(label: str, i: int, n: int | None = None) -> None:
    """Tell `critlib run` that loop `label` is at `i` of `n` (n None: count only); nothing outside it."""
    global _last_write
    path = os.environ.get(ENV)
    if not path:
        return
    now = time.monotonic()
    if now - _last_write < WRITE_EVERY and i != n:
        return
    _last_write = now
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{label} {i}/{n}" if n else f"{label} {i}")
        os.replace(tmp, path)  # the reader sees the old line or the new one, never half of one
    except OSError:  # progress is a courtesy: a full disk or a removed folder must not stop the work
        pass


def read(path: str | Path) -> str:
    """The last line `report` wrote to `path` ("" if none)."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


class Bar(tqdm):
    """tqdm (shown or not, as before) that also `report`s its count: used where critlib had a tqdm."""

    def __init__(self, iterable=None, desc: str | None = None, total: int | None = None, **kw):
        super().__init__(iterable, desc=desc, total=total, **kw)
        self.label = desc or "working"
        self.expected = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.done = 0
        self._iterating = False  # a shown tqdm calls `update` from its own iteration: counted there, not here

    def __iter__(self):
        self._iterating = True
        try:
            for x in super().__iter__():
                yield x
                self._count(1)
        finally:
            self._iterating = False

    def update(self, n=1):
        if not self._iterating:
            self._count(n)
        return super().update(n)

    def _count(self, n: int) -> None:
        self.done += n
        report(self.label, self.done, self.expected)


def track(iterable, label: str, total: int | None = None):
    """Yield from `iterable`, `report`ing each item done (for loops that show no bar)."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    for i, x in enumerate(iterable, 1):
        yield x
        report(label, i, total)


class Throttle:
    """`due(now)`: true at most once every `every` seconds, counted from `start`."""

    def __init__(self, every: float, start: float):
        self.every, self.last = every, start

    def due(self, now: float) -> bool:
        if now - self.last < self.every:
            return False
        self.last = now
        return True


def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def left(seconds: float) -> str:
    """'~40 s left', '~7 min left', '~2.5 h left'."""
    if seconds < 60:
        return f"~{max(5, 5 * round(seconds / 5))} s left"
    if seconds < 5400:
        return f"~{math.ceil(seconds / 60)} min left"
    return f"~{seconds / 3600:.1f} h left"


class Follower:
    """While a phase runs (`with Follower(prefix):`), shows the last line the kernel `report`ed, with the
    phase's time: on a terminal one line rewritten in place (cleared at the end), elsewhere a line at most
    every `every` seconds. Sets CRITLIB_PROGRESS for the kernels started inside, and removes it after."""

    def __init__(self, prefix: str, stream=None, every: float = 30.0, poll: float = 1.0):
        self.prefix, self.stream, self.every, self.poll = prefix, stream or sys.stderr, every, poll
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._shown = False

    def __enter__(self):
        fd, self.path = tempfile.mkstemp(prefix="critlib-progress-")
        os.close(fd)
        self._old = os.environ.get(ENV)
        os.environ[ENV] = self.path
        self.start = time.monotonic()
        self._thread = threading.Thread(target=self._follow, name="critlib-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._shown and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        if self._old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._old
        for p in (self.path, *Path(self.path).parent.glob(Path(self.path).name + ".*.tmp")):
            Path(p).unlink(missing_ok=True)

    def _follow(self) -> None:
        throttle = Throttle(self.every, self.start)
        while not self._stop.wait(self.poll):
            text = read(self.path)
            now = time.monotonic()
            if not text or not (self.tty or throttle.due(now)):
                continue
            line = f"{self.prefix}: {text} ({duration(now - self.start)})"
            if self.tty:
                width = shutil.get_terminal_size((100, 20)).columns
                self.stream.write("\r\x1b[K" + line[: max(20, width - 1)])
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
            self._shown = True


# Seconds per phase of a first `make run` on the default model (SmolLM2-135M, 8 + 8 windows of 128 tokens), on
# a 2-core Intel Xeon (BENCHMARKS.md, "The default model, `make run`, on the Intel Xeon")
DEFAULT_SECONDS = {"01_sensitivity": 72, "02_cross_metric": 103, "03_perturbation": 135, "04_super_weights": 44,
                   "05_token_explorer": 17, "06_applications": 202}
DEFAULT_TOKENS = (8 + 8) * 128


class Estimate:
    """Time left for the `keys` of a run: each phase's time in the last run (`previous`: {key: seconds}, from
    a run with the same parameters), else DEFAULT_SECONDS scaled by the data size (`tokens`: scoring +
    held-out tokens) until a phase is done, then by the measured pace of the phases done."""

    def __init__(self, keys: list[str], previous: dict[str, float], tokens: int):
        self.keys, self.previous = list(keys), previous
        self.size = tokens / DEFAULT_TOKENS
        self.done: dict[str, float] = {}

    def finished(self, key: str, seconds: float) -> None:
        self.done[key] = seconds

    def _scale(self) -> float:
        base = sum(DEFAULT_SECONDS.get(k, 60) for k in self.done)
        return sum(self.done.values()) / base if self.done else self.size

    def remaining(self) -> float:
        return sum(self.previous.get(k, DEFAULT_SECONDS.get(k, 60) * self._scale())
                   for k in self.keys if k not in self.done)

    def source(self) -> str:
        todo = [k for k in self.keys if k not in self.done]
        if all(k in self.previous for k in todo):
            return "estimate from the last run's phase times"
        return ("rough estimate: default phase times scaled by " +
                ("this run's pace so far" if self.done else "the data size"))

    def line(self) -> str:
        """'~7 min left (rough estimate: ...)', or '' when nothing is left."""
        if all(k in self.done for k in self.keys):
            return ""
        return f"{left(self.remaining())} ({self.source()})"


def previous_times(record: dict | None, same_params: bool) -> dict[str, float]:
    """The phase times of a folder's `run.json` that a new run with the same parameters can expect."""
    if not record or not same_params:
        return {}
    return {k: float(v["seconds"]) for k, v in record.get("phases", {}).items()
            if not v.get("from_earlier_run") and v.get("seconds") is not None}
