"""Truncation to seq_len + 1 tokens, skipping, and the counts reported."""

import numpy as np

from jlora.data import DataStats, load_examples, read_jsonl, tokenize_record


def test_stats_count_truncation_and_skips(write_jsonl, tokenizer):
    seq_len = 12
    rows = [
        {"text": "short"},
        {"text": "a b c d e f g h i j k l m n o p q r s t u v w x y z"},  # truncated
        {"prompt": "Q: x?\nA:", "completion": " a b c d e f g h i j k l"},  # truncated
        {"prompt": "p " * 30, "completion": " never reached"},  # truncated, then skipped
        {"messages": [{"role": "user", "content": "no reply"}]},  # skipped
        {"prompt": "Q:", "completion": " yes"},
    ]
    path = write_jsonl(rows)
    examples, stats = load_examples(path, tokenizer, seq_len=seq_len)

    full = [tokenize_record(r, tokenizer) for r in read_jsonl(path)]
    kept = [0, 1, 2, 5]
    assert [len(full[i].tokens) > seq_len + 1 for i in range(6)] == [0, 1, 1, 1, 0, 0]
    for example, i in zip(examples, kept, strict=True):
        n = min(len(full[i].tokens), seq_len + 1)
        np.testing.assert_array_equal(example.tokens, full[i].tokens[:n])
        np.testing.assert_array_equal(example.mask, full[i].mask[:n])
    assert stats == DataStats(
        examples=4,
        tokens=sum(min(len(full[i].tokens), seq_len + 1) for i in kept),
        target_tokens=sum(int(full[i].mask[1:seq_len + 1].sum()) for i in kept),
        truncated=3,
        skipped=2,
    )
    assert "4 examples" in str(stats) and "3 truncated" in str(stats)
