"""bitsandbytes on CPU as the independent reference for jlora.nf4 (torch tensors in, numpy out)."""
import types

import numpy as np
import pytest


def to_torch(w: np.ndarray):
    """numpy float32 / ml_dtypes bfloat16 / float16 -> torch tensor of the same dtype and bits."""
    import torch
    w = np.ascontiguousarray(w)
    if w.dtype.name == "bfloat16":
        return torch.from_numpy(w.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(w)


def to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy, bfloat16 as ml_dtypes bfloat16 (same bits)."""
    import ml_dtypes
    import torch
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def bits(a) -> np.ndarray:
    """The raw bits of an array, for bit-for-bit comparisons (NaN == NaN, -0.0 != 0.0)."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


@pytest.fixture(scope="session")
def bnb():
    """Reference calls into bitsandbytes.

    torch's CPU mean (the double-quant offset) splits sums of 32768 or more elements between
    threads; every absmax vector here is shorter, so the thread count does not matter.
    """
    import torch
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    def quantize(w: np.ndarray, blocksize: int, double_quant: bool):
        packed, state = F.quantize_4bit(to_torch(w), blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=double_quant)
        return packed, state

    def absmax(state) -> "torch.Tensor":
        if not state.nested:
            return state.absmax
        return F.dequantize_blockwise(state.absmax, state.state2) + state.offset

    def dequantize(packed, state, dtype) -> np.ndarray:
        """bitsandbytes' own torch kernel over flat blocks (as on CUDA), without torch.compile."""
        code = F.get_4bit_type("nf4", device="cpu")
        out = _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax(state), code,
                                                   state.blocksize, tuple(state.shape), dtype)
        return to_numpy(out)

    return types.SimpleNamespace(F=F, torch=torch, quantize=quantize, dequantize=dequantize,
                                 absmax=absmax, to_torch=to_torch, to_numpy=to_numpy)


@pytest.fixture(scope="session", name="bits")
def bits_fixture():
    return bits
