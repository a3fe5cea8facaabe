"""The tokenizer of a checkpoint directory as GGUF metadata (`tokenizer.ggml.*`), as llama.cpp's
convert_hf_to_gguf.py writes it.

Three kinds, tried in convert_hf_to_gguf.py's order:

    tokenizer.model (+ sentencepiece pkg)    "llama" (SentencePiece, its scores)  gguf.SentencePieceVocab
    tokenizer.json, BPE with byte_fallback   "llama" (SentencePiece-style BPE)   gguf.LlamaHfVocab
    tokenizer.json, other BPE                "gpt2"  (byte-level BPE + merges)    this module (get_vocab_base)

Every id below the model's ``vocab_size`` gets a token: ids the tokenizer does not use become
``[PAD<i>]`` of type UNUSED (llama.cpp requires ``len(tokens) == vocab_size``). Added tokens are
CONTROL when special, USER_DEFINED otherwise. bos/eos/pad ids, add_bos/add_eos, the BPE merges and the
chat template (tokenizer_config.json, chat_template.jinja or chat_template.json) are written by gguf's
SpecialVocab, the code llama.cpp's converter uses.

``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name) is read off the pre-tokenizer's split regex
for the byte-level BPE families jlora knows (Llama 3 "llama-bpe", Qwen2 "qwen2"); anything else is
written as "default" (llama.cpp's generic GPT-2 split). convert_hf_to_gguf.py instead hashes the
tokenization of a probe text against its table and refuses unknown tokenizers.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _split_patterns(pre) -> list[str]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _split_patterns(sub)]
    pattern = pre.get("pattern") if pre.get("type") == "Split" else None
    return [pattern["Regex"]] if isinstance(pattern, dict) and "Regex" in pattern else []


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json ("default" if not known)."""
    for pattern in _split_patterns(tokenizer_json.get("pre_tokenizer")):
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    return "default"


def _pad(tokens: list, scores: list, types: list, vocab_size: int, where: Path) -> None:
    if len(tokens) > vocab_size:
        raise ValueError(f"{where}: the tokenizer has {len(tokens)} tokens but config.json's vocab_size is "
                         f"{vocab_size}; llama.cpp needs one token per embedding row")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)


def _byte_level_bpe(model_dir: Path, vocab_size: int):
    """(tokens, token types) like convert_hf_to_gguf.py's get_vocab_base (tokens by id, gaps as [PAD<i>]),
    read from tokenizer.json itself (AutoTokenizer may add a model class's default special tokens)."""
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())} but config.json's "
                         f"vocab_size is {vocab_size}; llama.cpp needs one token per embedding row")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> str:
    """Writes the tokenizer of ``model_dir`` into ``writer``; returns the kind ("gpt2" or "llama").

    Raises:
      ValueError: no tokenizer file, a tokenizer larger than ``vocab_size``, or a SentencePiece-only
        tokenizer without the ``sentencepiece`` package.
    """
    model_dir = Path(model_dir)
    tj_path, sp_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else None
    model = (tj or {}).get("model") or {}
    vocab = None
    if sp_path.is_file():  # convert_hf_to_gguf's order: SentencePiece first (its scores drive llama.cpp's merges)
        try:
            vocab = gguf.SentencePieceVocab(model_dir)
        except ImportError:
            if tj is None:
                raise ValueError(f"{sp_path}: reading a SentencePiece tokenizer needs the sentencepiece package "
                                 f"(pip install sentencepiece)") from None
    if vocab is None and tj is not None and model.get("type") == "BPE" and model.get("byte_fallback"):
        try:
            vocab = gguf.LlamaHfVocab(model_dir)
        except (FileNotFoundError, TypeError):
            vocab = None  # not the SentencePiece-style layout gguf reads: byte-level BPE below, as llama.cpp
    if vocab is None and tj is not None and model.get("type") == "BPE":
        tokens, types = _byte_level_bpe(model_dir, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tj))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
        return "gpt2"
    if vocab is None and tj is not None:
        raise ValueError(f"{tj_path}: a {model.get('type')!r} tokenizer; the GGUF export writes BPE "
                         f"(tokenizer.json) and SentencePiece (tokenizer.model) tokenizers")
    if vocab is None:
        raise ValueError(f"{model_dir}: no tokenizer.json or tokenizer.model; a GGUF file must carry the "
                         f"vocabulary (export from a checkpoint with its tokenizer files)")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    _pad(tokens, scores, types, vocab_size, model_dir)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return "llama"
