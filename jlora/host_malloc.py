"""Keep the process's freed host memory for reuse instead of handing it back to the OS every step.

Why: XLA:CPU allocates one buffer for all temporaries of an executable each time it runs and frees it
when the run ends (the 135m-shaped LoRA step of benchmarks/train_step.py: 2.6 GB per step). glibc
serves a block that large with a fresh `mmap` and returns it with `munmap`, so every step touches
brand-new pages: ~656,000 page faults per step there (the kernel zeroes each 4 KiB page again), 1.3 s
of system time per 3.7 s step, and steps ~10% slower than with the memory kept (benchmarks/RESULTS.md,
"Host page faults"). Setting, through glibc's `mallopt`, before jax starts its threads:

    M_ARENA_MAX = 1         every thread allocates from the main heap (a per-thread arena maps any
                            block over 64 MiB on its own, whatever the settings below say)
    M_MMAP_MAX = 0          large blocks come from that heap, not from their own mappings
    M_TRIM_THRESHOLD = -1   freed memory at the top of the heap is kept, never trimmed

so a step's temporaries reuse the previous step's pages (0 faults per step). The cost: the process
keeps its peak host memory until it exits, as a caching allocator does; it does not raise the peak.

Then the heap it keeps is asked for transparent huge pages (2 MiB instead of 4 KiB): where the kernel's
mode is "madvise" (the usual default), 3/4 of physical memory's worth of heap address space is reserved
and marked MADV_HUGEPAGE (address space only: nothing is touched until used), as glibc's
`glibc.malloc.hugetlb=1` tunable would, which has to be set before the process starts. The step's
multi-megabyte operands then cost the CPU fewer TLB misses: steps 2-6% faster, while the first step
(compile) takes longer (135m shape: +3 s on 16 s), repaid in ~20 steps (benchmarks/RESULTS.md).

It also costs (measured, benchmarks/RESULTS.md): with one arena, malloc-heavy work from several threads waits
on its lock: compiling is ~35% slower (a decode program 1.8 -> 2.4 s) and batch-8 decode ~15% slower.
So it is on by default only where the step dominates: the `jlora train` command. `import jlora` calls
`keep_freed_host_memory()` first thing, before jax (and numpy) start threads, which is when it must run;
it applies when the process is `jlora train` (or `python -m jlora.cli train`), on Linux with glibc, and
looks CPU-only (no GPU or TPU device node, or JAX_PLATFORMS=cpu: accelerator temporaries live in device
memory). `JLORA_KEEP_HOST_MEMORY=1` applies it to any process (a training script: set it before Python
starts, or import jlora before jax and numpy), `=0` never.
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys
import warnings

ENV = "JLORA_KEEP_HOST_MEMORY"

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# Device nodes of accelerators jax can use: NVIDIA and AMD GPUs, TPU v2-v4 (accel) and v5+ (vfio groups).
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")

_outcome: str | None = None
_huge_pages: str | None = None

# Transparent huge pages: madvise(2)'s MADV_HUGEPAGE, the x86-64 / arm64 (4 KiB base) huge page size.
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
HEAP_SHARE = 0.75  # of physical memory: how much heap address space is reserved and advised


def accelerator_present() -> bool:
    """True when JAX_PLATFORMS names something other than cpu, or an accelerator device node exists."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    return any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def training_command(argv: list[str]) -> bool:
    """True for `jlora train ...` and `python -m jlora.cli train ...` (argv[0] is "-m" while the package
    imports)."""
    return len(argv) >= 2 and argv[1] == "train" and os.path.basename(argv[0]) in ("jlora", "-m", "cli.py")


def glibc_version() -> str | None:
    """'2.36' under glibc, None otherwise (musl, macOS, Windows)."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    return version if name == "glibc" else None


def keep_freed_host_memory() -> str:
    """Applies the settings above once per process when they fit (see the module docstring), and then
    asks for huge pages on the heap (`huge_pages()` says how that went).

    Returns what happened, for diagnostics: "applied", or why not ("disabled by ...", "not the `jlora
    train` command ...", "not Linux with glibc", "an accelerator is present", "mallopt refused ...").
    """
    global _outcome, _huge_pages
    if _outcome is None:
        _outcome = _apply()
        _huge_pages = _advise_huge_pages() if _outcome == "applied" else "not asked (the setting is off)"
    return _outcome


def huge_pages() -> str | None:
    """What came of the huge-page request: "advised <bytes>", or why not; None before
    keep_freed_host_memory() ran."""
    return _huge_pages


def _apply() -> str:
    setting = os.environ.get(ENV, "").strip()
    if setting not in ("", "0", "1"):
        outcome = f"disabled: {ENV}={setting!r} is not 0 or 1"
        warnings.warn(f"{outcome} (glibc's malloc defaults kept; see jlora/host_malloc.py)", stacklevel=2)
        return outcome
    if setting == "0":
        return f"disabled by {ENV}=0"
    if setting != "1" and not training_command(sys.argv):
        return f"not the `jlora train` command (set {ENV}=1 to apply it)"
    if not sys.platform.startswith("linux") or glibc_version() is None:
        return "not Linux with glibc"
    if setting != "1" and accelerator_present():
        return f"an accelerator is present (set {ENV}=1 to apply anyway)"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        return f"not Linux with glibc ({e})"
    for name, param, value in (("M_ARENA_MAX", M_ARENA_MAX, 1), ("M_MMAP_MAX", M_MMAP_MAX, 0),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, -1)):
        if libc.mallopt(param, value) != 1:
            return f"mallopt refused {name}={value}"
    return "applied"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None when unknown."""
    try:
        with open(THP_MODE_FILE) as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _advise_huge_pages() -> str:
    """Reserves heap address space and marks it MADV_HUGEPAGE, so the heap the settings above keep is
    backed by 2 MiB pages. Nothing is touched: the reservation is address space, not memory.

    malloc(n) with M_MMAP_MAX = 0 extends the heap (brk) by n; free() returns the block to the heap's top,
    which M_TRIM_THRESHOLD = -1 never trims; later allocations are carved from that advised top.
    glibc's own `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` does the same but must be set before the process
    starts. Where the kernel's mode is "always" the heap gets huge pages anyway; under "never" it cannot.
    """
    mode = thp_mode()
    if mode != "madvise":
        return f"not needed (transparent huge pages: {mode})" if mode == "always" else \
            f"not available (transparent huge pages: {mode or 'unknown'})"
    total = _physical_memory()
    if not total:
        return "not asked (physical memory unknown)"
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = int(total * HEAP_SHARE)
    block = libc.malloc(size)
    if not block:
        return f"not asked (malloc refused {size:,} bytes of address space)"
    start = -(-block // HUGE_PAGE) * HUGE_PAGE
    end = (block + size) // HUGE_PAGE * HUGE_PAGE
    failed = libc.madvise(start, end - start, MADV_HUGEPAGE) != 0
    libc.free(block)
    return f"madvise failed (errno {ctypes.get_errno()})" if failed else f"advised {end - start:,} bytes"
