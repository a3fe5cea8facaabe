"""A packed row's logits equal each example's own logits (transformers, unpacked, is the reference)."""
import numpy as np

import jlora


def test_packed_logits_equal_unpacked(checkpoint, hf_model, close32, logits32_and_64, packed_row):
    path = checkpoint("mistral")  # sliding window 8: also checked inside packed segments
    examples, row, seg, pos = packed_row(pad=4)
    packed = np.asarray(jlora.load_hf(path)(row, positions=pos, segment_ids=seg))
    ref = hf_model(path)
    start = 0
    for ex in examples:
        want, want64 = logits32_and_64(ref, ex[None])
        close32(packed[0, start:start + len(ex)], want[0], want64[0], what=f"example at {start}")
        start += len(ex)
