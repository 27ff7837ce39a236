"""Peak resident memory of a benchmark phase (Linux): VmHWM, resettable through /proc/self/clear_refs."""
from __future__ import annotations

import gc


def vm_hwm_mb() -> float | None:
    """Peak RSS since the last reset, in MB; None where /proc is missing."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_hwm() -> bool:
    """Start a new peak (True when the kernel allowed it)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
