"""This process's peak memory, measured: what `zerollm estimate` is checked against.

    probe = PeakMemory()        # at the start of a stage, before any model is built
    ...                         # build engines, train
    probe.growth()              # bytes: peak over the start

CPU: the peak resident set (VmHWM of /proc/self/status) minus the resident set at the start;
the kernel's peak is reset first (`5` to /proc/self/clear_refs), so imports and process-group
setup before the probe do not count. GPU: `torch.cuda.max_memory_allocated` after a reset
of the peak statistics (allocated tensors, not the caching allocator's reserve).
"""

from __future__ import annotations

import os

import torch

_STATUS = "/proc/self/status"
ENV_ESTIMATE = "ZEROLLM_ESTIMATE_BYTES"  # the launcher's estimate of a rank's peak, logged beside the measured one


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The resident set now (0 where /proc is missing)."""
    return (_status_kib("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """The peak resident set since the process started or the last reset."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def reset_peak_rss() -> bool:
    """Make the peak resident set the current one (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory growth of this process from the moment it is made (see the module doc)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            self.device = int(os.environ.get("LOCAL_RANK", 0))  # the rank's device, set or not yet
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()  # where it cannot, the peak since the process started counts
            self.base = rss_bytes()

    def growth(self) -> int:
        """Bytes: the peak since the start minus what was in use at the start."""
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, peak_rss_bytes() - self.base)

    @staticmethod
    def kind_here() -> str:
        return "max_memory_allocated" if torch.cuda.is_available() else "peak RSS growth"


_STAGE: PeakMemory | None = None  # started by `train.run.start`, before any engine is built


def start_stage_probe() -> PeakMemory:
    """Start measuring this process's stage (every rank; `stage_growth` reads it)."""
    global _STAGE
    _STAGE = PeakMemory()
    return _STAGE


def stage_growth() -> int | None:
    """Peak bytes over the stage's start, or None when no stage probe runs (in-process tests)."""
    return _STAGE.growth() if _STAGE is not None else None
