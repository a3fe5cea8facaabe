"""Training data: JSONL records -> tokenized examples -> packed, sharded, resumable batches.

    records = read_jsonl("train.jsonl")
    examples, stats = tokenize_records(records, tokenizer, seq_len=T)
    for batch in BatchIterator(examples, seq_len=T, batch_size=B, packing=True, seed=0):
        ...  # batch["inputs"], ["targets"], ["loss_mask"], ["positions"], ["segment_ids"]
"""

from jlora.data.batch import BATCH_KEYS
from jlora.data.batch import make_batch
from jlora.data.errors import DataError
from jlora.data.formats import FIELD_SETS
from jlora.data.formats import record_format
from jlora.data.iterator import BatchIterator
from jlora.data.iterator import steps_per_epoch
from jlora.data.jsonl import Record
from jlora.data.jsonl import read_jsonl
from jlora.data.load import DataStats
from jlora.data.load import load_examples
from jlora.data.load import tokenize_records
from jlora.data.packing import plan_rows
from jlora.data.readers import Columns
from jlora.data.readers import iter_records
from jlora.data.readers import read_records
from jlora.data.split import split_holdout
from jlora.data.tokenize import Example
from jlora.data.tokenize import tokenize_record
