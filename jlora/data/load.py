"""Records to training examples: tokenize, truncate to seq_len + 1, count."""

import dataclasses
import os
from collections.abc import Iterable

from jlora.data.errors import DataError
from jlora.data.jsonl import Record
from jlora.data.readers import Columns, iter_records
from jlora.data.tokenize import Example, tokenize_record


@dataclasses.dataclass(frozen=True)
class DataStats:
    """Counts over the kept examples, after truncation.

    ``tokens`` sums example lengths; ``target_tokens`` counts predictions the loss trains
    on; ``truncated`` counts examples cut to ``seq_len + 1`` tokens; ``skipped`` counts
    records left with no trained token (e.g. a prompt longer than the window, or a
    conversation without an assistant reply), which are dropped.
    """

    examples: int
    tokens: int
    target_tokens: int
    truncated: int
    skipped: int

    def __str__(self) -> str:
        return (f"{self.examples:,} examples, {self.tokens:,} tokens ({self.target_tokens:,} "
                f"trained on), {self.truncated:,} truncated, {self.skipped:,} skipped")


def tokenize_records(records: Iterable[Record], tokenizer, *, seq_len: int
                     ) -> tuple[list[Example], DataStats]:
    """Tokenizes records, truncating each to ``seq_len + 1`` tokens (``seq_len`` predictions).

    ``records`` may be a lazy iterator (``iter_records``): each is tokenized as it comes, so only
    the token ids are kept.

    Raises:
      DataError: for a bad record (naming its file and line), or when no record is left
        with a token to train on.
    """
    if seq_len < 1:
        raise ValueError(f"{seq_len=} must be at least 1")
    examples, truncated, skipped, count, first = [], 0, 0, 0, None
    for record in records:
        count += 1
        first = first or record
        example = tokenize_record(record, tokenizer)
        if len(example.tokens) > seq_len + 1:
            example = Example(example.tokens[:seq_len + 1], example.mask[:seq_len + 1])
            truncated += 1
        if not example.mask[1:].any():
            skipped += 1
            continue
        examples.append(example)
    if first is None:
        raise DataError("no examples: the record list is empty")
    if not examples:
        raise DataError(f"{first.path}: none of the {count} examples has a token to "
                        f"train on within seq_len + 1 = {seq_len + 1} tokens")
    stats = DataStats(
        examples=len(examples),
        tokens=sum(len(e.tokens) for e in examples),
        target_tokens=sum(int(e.mask[1:].sum()) for e in examples),
        truncated=truncated,
        skipped=skipped,
    )
    return examples, stats


def load_examples(path: str | os.PathLike, tokenizer, *, seq_len: int, columns: Columns = Columns()
                  ) -> tuple[list[Example], DataStats]:
    """Reads JSONL, parquet, CSV or a saved dataset (``jlora.data.readers``) and tokenizes it:
    ``tokenize_records(iter_records(path, columns), ...)``."""
    return tokenize_records(iter_records(path, columns), tokenizer, seq_len=seq_len)
