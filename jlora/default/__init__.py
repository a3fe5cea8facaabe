"""Assets for the embedded default run: a bundled dataset and a tokenizer trained on it."""

from jlora.default.dataset import dataset_paths
from jlora.default.tokenizer import build_tokenizer
from jlora.default.checkpoint import build_default_base
