"""Which backend ``impl="auto"`` runs, and whether the Triton path can run.

    TPU, or any backend with interpret=True   -> "pallas" (Mosaic kernels)
    anything else (CPU, GPU)                  -> "xla"

On GPU the Triton kernels are opt-in (impl="triton" / `jlora train --kernels triton`): they pass
under Triton's interpreter, but the jax-triton path has not yet run or been timed on a GPU, and
"auto" only switches to a kernel that benchmarks/kernels.py measured faster there (RESULTS.md).

Callers still fall back to "xla" when the shapes or the dtype do not suit the
chosen kernel.
"""

from __future__ import annotations

import functools

import jax

from jlora.kernels.block_sizes import TRITON_BLOCK_SIZES


@functools.cache
def triton_available() -> bool:
    """True when jax-triton imports (it needs a GPU build of jaxlib) and triton too."""
    try:
        import jax_triton  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        import triton  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def require_triton() -> None:
    """Raises ImportError saying what to install when impl='triton' cannot run."""
    if not triton_available():
        raise ImportError(
            "impl='triton' needs triton and jax-triton with a CUDA build of jax "
            "(pip install 'jlora[gpu]'); use impl='xla' or impl='auto'")


def auto_impl(interpret: bool) -> str:
    """The backend impl='auto' prefers on this process's default backend."""
    backend = jax.default_backend()
    if interpret or backend == "tpu":
        return "pallas"
    return "xla"  # GPU: Triton stays opt-in until measured (module docstring)


def triton_blocks(block_sizes):
    """The Triton tiles: block_sizes (checked) or TRITON_BLOCK_SIZES.

    Triton tiles are ``tl.arange`` extents and ``tl.dot`` operands: powers of
    two, at least 16. Shapes need not divide (the kernels mask).
    """
    if block_sizes is None:
        return TRITON_BLOCK_SIZES
    for name, value in vars(block_sizes).items():
        if value < 16 or value & (value - 1):
            raise ValueError(f"impl='triton' needs power-of-two tiles >= 16, got "
                             f"block_sizes.{name}={value}")
    return block_sizes
