"""What a run tells its user: one-line messages and named phases with their elapsed time."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator


def log(msg: str) -> None:
    """A line on stderr (stdout stays for results: tables, paths)."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """``[name] ...`` when a phase starts and ``[name] done in N s, peak RSS M MB`` when it
    ends (the process's peak so far: the first phase whose peak jumps is where memory went)."""
    log(f"[{name}] ...")
    start = time.time()
    yield
    log(f"[{name}] done in {time.time() - start:.1f} s, peak RSS {memory_mb():,.0f} MB")


def memory_mb(key: str = "VmHWM") -> float:
    """This process's memory in MB from ``/proc/self/status``: ``VmHWM`` the peak so far,
    ``VmRSS`` now. Not ``ru_maxrss``, which a child inherits from its parent's peak across
    fork and exec; that is the fallback for the peak where there is no ``/proc``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return 0.0


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A setting that cannot act on the data says so once per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        log(f"note: {message}")
