"""A packed row's logits equal each example's own logits (transformers, unpacked, is the reference)."""
import numpy as np
import torch

import jlora


def test_packed_logits_equal_unpacked(checkpoint, hf_model, close32, logits32_and_64):
    path = checkpoint("mistral")  # sliding window 8: also checked inside packed segments
    rng = np.random.RandomState(4)
    lengths = [7, 12, 5]
    examples = [rng.randint(3, 96, n) for n in lengths]
    row = np.concatenate(examples)[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    pos = np.concatenate([np.arange(n) for n in lengths])[None]
    pad = 4
    row, seg, pos = (np.pad(a, ((0, 0), (0, pad))) for a in (row, seg, pos))
    packed = np.asarray(jlora.load_hf(path)(row, positions=pos, segment_ids=seg))
    ref = hf_model(path)
    start = 0
    for ex in examples:
        want, want64 = logits32_and_64(ref, ex[None])
        close32(packed[0, start:start + len(ex)], want[0], want64[0], what=f"example at {start}")
        start += len(ex)
