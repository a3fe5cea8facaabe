"""The files that travel with a model besides config.json and its weights: one list for the whole convert layer.

- TOKENIZER_MODEL_FILES: any one of these is a tokenizer transformers can load (fast `tokenizer.json`,
  SentencePiece `tokenizer.model` / `spiece.model` (T5-style names), BPE `vocab.json`);
  `jlora.convert.model_dir` requires one.
- TOKENIZER_FILES: everything `AutoTokenizer.save_pretrained` may write (the model files above, BPE
  merges, the tokenizer config, special/added tokens, the chat template as `.jinja` or `.json`).
- MODEL_SIDE_FILES: TOKENIZER_FILES + generation_config.json: what the Hub download fetches
  (`jlora.convert.hub.ALLOW_PATTERNS`) and what a merged export copies from its base
  (`jlora.convert.merged`), so a file fetched is never dropped on the way out.
"""
from __future__ import annotations

TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json")
TOKENIZER_FILES = TOKENIZER_MODEL_FILES + ("merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                                           "added_tokens.json", "chat_template.jinja", "chat_template.json")
MODEL_SIDE_FILES = TOKENIZER_FILES + ("generation_config.json",)
