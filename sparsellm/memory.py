"""Peak memory of this process, resettable per stage (Linux VmHWM), plus the CUDA allocator's peak."""
import ctypes
import gc
import ctypes.util
import resource
import sys

import torch


_process_peak = 0  # the highest VmHWM before any reset: process_peak_bytes covers the whole run


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); elsewhere the peak stays process-wide.
    global _process_peak
    _process_peak = max(_process_peak, peak_rss_bytes())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def process_peak_bytes() -> int:
    """The peak resident memory of the whole process so far, whatever reset_peak did since (the kernel's
    ru_maxrss would not do: on Linux it follows the reset VmHWM)."""
    return max(_process_peak, peak_rss_bytes())


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_cuda_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def available_bytes() -> int | None:
    """Memory the kernel can give this process without swapping (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed() -> None:
    """Free what is unreachable now and give the heap's free pages back to the system. Measured on a
    137 MB layer: the tensors a written layer leaves in reference cycles stay resident until the next
    garbage collection (a whole layer), and tensors below glibc's mmap threshold (up to 32 MiB) fragment
    the heap, which keeps ~25 MB per layer more resident unless trimmed (glibc malloc_trim)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of at least `threshold` bytes with its own mmap, returned to the system on
    free. glibc otherwise raises its mmap threshold after the first large free (up to 32 MiB), and later
    layer-sized tensors (a structurally cut weight, a serialized shard) come from the heap, whose holes
    stay resident: measured ~20 MB more per decoder layer streamed."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
