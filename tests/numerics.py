"""How tests compare float32 results with an independent float64 truth (plain functions; tests/conftest.py
offers them as fixtures: rel, close32, logits32_and_64, hf_model)."""
import copy

import numpy as np

EPS32 = 2.0 ** -23


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def float32_close(got, ref32, ref64, *, factor: float = 8.0, what: str = "") -> None:
    """Asserts that `got` (a float32 computation) is about as close to the float64 truth `ref64` as the
    reference implementation's own float32 result `ref32` is: rel(got, ref64) <= factor * rel(ref32,
    ref64) + 64 * eps32 (relative to max |ref64|).

    Calibrating on the reference's float32 error on the same machine makes the bound hold on any x86
    CPU (AVX2 and AVX-512 sum float32 in different orders, and both sides move together), while an
    error a bug makes (a wrong scale, a missing term) is orders of magnitude above it.
    """
    got_err, ref_err = rel_err(got, ref64), rel_err(ref32, ref64)
    bound = factor * ref_err + 64 * EPS32
    assert got_err <= bound, f"{what}: rel error {got_err:.3g} vs float64 > {bound:.3g} ({factor} x the " \
                             f"reference's float32 error {ref_err:.3g} + 64 eps32)"


def torch_logits32_and_64(model, ids):
    """(float32 logits, float64 logits) of a torch model on `ids`; the float64 copy is the reference truth."""
    import torch
    with torch.no_grad():
        t = torch.tensor(np.asarray(ids), dtype=torch.long)
        return model(t).logits.numpy(), copy.deepcopy(model).double()(t).logits.numpy()


def transformers_model(path):
    """The transformers model saved at `path`, in float32, eval mode."""
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def packed_row_matches_examples(model, ref, examples, row, positions, segment_ids, *, what: str = "") -> None:
    """jlora's logits of one packed row (`model`, jitted) equal the torch reference `ref` run on each example
    alone (float32_close against its float64 copy): packing leaks nothing between examples."""
    import jax
    packed = np.asarray(jax.jit(lambda r, p, s: model(r, positions=p, segment_ids=s))(row, positions, segment_ids))
    start = 0
    for ex in examples:
        want, want64 = torch_logits32_and_64(ref, ex[None])
        float32_close(packed[0, start:start + len(ex)], want[0], want64[0], what=f"{what} example at {start}")
        start += len(ex)
