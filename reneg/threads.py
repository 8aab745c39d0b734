"""Torch's CPU threads: a fixed count (``--threads N``), or ``auto``: the cores other work leaves free.

Why ``auto``: torch's OpenMP pool ends every parallel operation at a barrier where all its threads
meet; when other processes keep the cores busy, the others wait at every barrier for the thread the
scheduler took away, and a step made of many small operations runs far slower than its fair share of
the machine (docs/performance.md, "A busy machine", has the measurements). A single thread never waits
for a peer. ``RENEG_THREADS=N`` in the environment makes the command line's ``auto`` a fixed ``N``.
"""

from __future__ import annotations

import os
import time

ENV = "RENEG_THREADS"  # replaces ``auto`` (the default) for a whole machine or CI: a number, or auto
INTERVAL = 1.0  # seconds between two looks at the machine's load
MAX_AUTO = 8  # more threads rarely pay for one image model's step on a CPU

_governor = None


def parse_threads(value, flag: str = "--threads"):
    """``"auto"`` or an integer >= 1 (as text or int); anything else raises ``ValueError`` naming ``flag``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{flag} must be 'auto' or a whole number of threads >= 1, got {value!r}") from None
    if not 1 <= n <= 4096:
        raise ValueError(f"{flag} must be 'auto' or a whole number of threads from 1 to 4096, got {n}")
    return n


def default_spec():
    """What ``--threads auto`` means here: ``$RENEG_THREADS`` when set, else ``auto``."""
    value = os.environ.get(ENV, "").strip()
    return parse_threads(value, ENV) if value else "auto"


def _cpu_ticks():
    """(all CPUs' busy ticks, this process's ticks) or None where /proc is not readable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat", encoding="ascii") as f:
            own = f.read().rsplit(")", 1)[1].split()
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
        return total - idle, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class _Governor:
    """``auto`` at work: at most every :data:`INTERVAL` seconds while sampling, how much CPU the rest of
    the machine used since the last look (Linux: ``/proc/stat`` less this process's own
    ``/proc/self/stat``), and, once two looks in a row agree (:meth:`settle`), the cores left free: at
    least one, at most the cores there are (and at most ``most``)."""

    def __init__(self, cores: int, most: int):
        self.cores, self.most = cores, most
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = (time.monotonic(), _cpu_ticks())
        self.others = 0.0  # cores the rest of the machine used over the last interval
        self.pending = None  # a new count seen at one look; taken when the next look agrees

    def threads_for(self, others: float) -> int:
        return max(1, min(self.most, int(self.cores - others + 0.5)))

    def look(self) -> int | None:
        now, ticks = time.monotonic(), _cpu_ticks()
        t0, ticks0 = self.last
        if ticks is None or ticks0 is None or now - t0 <= 0:
            return None
        self.last = (now, ticks)
        busy, own = ticks[0] - ticks0[0], ticks[1] - ticks0[1]
        self.others = max(0.0, (busy - own) / self.hz / (now - t0))
        return self.threads_for(self.others)

    def settle(self, current: int) -> int | None:
        """One look; a new count only when two looks in a row ask for it, so that a blip of other work
        (a process starting, a page repainting) does not change the count, and with it the rounding."""
        n = self.look()
        if n is None or n == current:
            self.pending = None
            return None
        if self.pending != n:
            self.pending = n
            return None
        self.pending = None
        return n


def apply_threads(spec="auto", most: int | None = None) -> int:
    """Set torch's CPU threads from ``spec`` (``parse_threads``'s forms); returns the count now in use.
    ``most`` caps what ``auto`` may choose (the demo's small models gain nothing beyond two). Where
    ``/proc`` can not be read (not Linux), ``auto`` is torch's own default, fixed."""
    import torch

    global _governor
    spec = parse_threads(spec)
    _governor = None
    if spec != "auto":
        torch.set_num_threads(spec)
        return spec
    cores = os.cpu_count() or 1
    if _cpu_ticks() is None:  # not Linux: torch's default
        return torch.get_num_threads()
    gov = _Governor(cores, max(1, min(MAX_AUTO, cores, most or cores)))
    time.sleep(0.2)  # a first look before the first step
    n = gov.look() or gov.most
    torch.set_num_threads(n)
    gov.last = (time.monotonic(), _cpu_ticks())
    _governor = gov
    return n


def release() -> None:
    """Stop following the load (the command is over); the thread count stays as it is."""
    global _governor
    _governor = None


def tick() -> None:
    """Between steps: under ``auto``, follow the machine's load (at most one look per INTERVAL).

    The sampler calls it once per step, from the thread that runs the model (OpenMP's thread count is a
    per-thread setting), so the count changes only between sampling steps; it costs a clock read unless
    a look is due."""
    gov = _governor
    if gov is None or time.monotonic() - gov.last[0] < INTERVAL:
        return
    import torch

    n = gov.settle(torch.get_num_threads())
    if n is not None:
        torch.set_num_threads(n)


def describe() -> str:
    import torch

    if _governor is None:
        return f"{torch.get_num_threads()} CPU threads"
    return f"{torch.get_num_threads()} CPU threads (auto: follows the load of {_governor.cores} cores)"
