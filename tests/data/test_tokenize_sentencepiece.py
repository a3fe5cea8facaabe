"""Prompt/completion and chat tokenization with SentencePiece-style tokenizers (Llama 2, Mistral, Gemma).

Such tokenizers mark a word start with "\u2581" and give every encoded text a leading one, so tokenizing
prompt and completion separately puts an extra "\u2581" at the join. The trained sequence must be the
tokenization of the whole text; the references here are the tokenizer itself (encode of the full text,
`char_to_token`) and transformers' `return_assistant_tokens_mask`.

The tokenizers are built locally with the `tokenizers` library, in the two layouts found on the Hub:
* "llama2": the converted Llama 2 / Mistral v0.1 tokenizer.json (normalizer Prepend("\u2581") +
  Replace(" ", "\u2581"), BPE with byte fallback) in a PreTrainedTokenizerFast;
* "metaspace": transformers' LlamaTokenizerFast (Metaspace pre-tokenizer, prepend_scheme "first",
  BPE with byte fallback) built from the same vocabulary and merges.
"""

import json

import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from jlora.data import Record, tokenize_record

CORPUS = [
    "Q: What is the capital of France?\nA: The capital of France is Paris.",
    "Q: Reverse the words: cat sun red.\nA: red sun cat.",
    "User: What is the capital of Chile?\nAssistant: Santiago is the capital of Chile.",
    "no space at the end and none at the start, empty prompt, empty completion",
]
SPECIAL = ["<unk>", "<s>", "</s>"]


def _train_bpe() -> tokenizers.Tokenizer:
    """A SentencePiece-like BPE: merges never cross a word start, bytes fall back to <0xNN> tokens."""
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  special_tokens=SPECIAL + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def _llama2_layout(tok: tokenizers.Tokenizer):
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


def _metaspace_layout(tok: tokenizers.Tokenizer):
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return transformers.LlamaTokenizerFast(vocab=model["vocab"], merges=merges)


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sp_tokenizer(request):
    build = {"llama2": _llama2_layout, "metaspace": _metaspace_layout}[request.param]
    tokenizer = build(_train_bpe())
    assert tokenizer.is_fast and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    return tokenizer


def _record(data):
    return Record(data, "mem.jsonl", 1)


@pytest.mark.parametrize("prompt, completion", [
    ("Q: What is the capital of France?\nA:", " The capital of France is Paris."),
    ("no space at the end", "and none at the start"),
    ("Q: Reverse the words: cat sun red.\nA: ", "red sun cat."),
    ("", "empty prompt"),
    ("empty completion", ""),
])
def test_prompt_completion_trains_on_the_tokenization_of_the_whole_text(sp_tokenizer, prompt, completion):
    tok = sp_tokenizer
    example = tokenize_record(_record({"prompt": prompt, "completion": completion}), tok)

    full = tok(prompt + completion, add_special_tokens=False)
    ids = list(full["input_ids"])
    assert example.tokens.tolist() == [tok.bos_token_id] + ids + [tok.eos_token_id]
    # the first trained token is the one holding the completion's first character
    first = full.char_to_token(len(prompt)) if completion else len(ids)
    assert example.mask.tolist() == [False] * (1 + first) + [True] * (len(ids) - first) + [True]
    trained = example.tokens[example.mask].tolist()[:-1]
    assert tok.decode(trained).strip() == completion.strip()


def test_separate_tokenization_would_differ(sp_tokenizer):
    """The premise: encoding the pieces separately gives a different sequence than the whole text."""
    tok = sp_tokenizer
    prompt, completion = "no space at the end", "and none at the start"
    joined = tok.encode(prompt, add_special_tokens=False) + tok.encode(completion, add_special_tokens=False)
    assert joined != tok.encode(prompt + completion, add_special_tokens=False)


# "Assistant: " ends in a space: it tokenizes to a lone "\u2581" alone, while the conversation has
# "\u2581Santiago", so the generation prompt does not tokenize to a prefix of the conversation.
SPACE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ 'Assistant: ' }}{% generation %}{{ m['content'] + eos_token }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ 'User: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Chile?"},
     {"role": "assistant", "content": "Santiago is the capital of Chile."}],
    [{"role": "user", "content": "Reverse the words: cat sun red."},
     {"role": "assistant", "content": "red sun cat."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_messages_match_transformers_assistant_mask(sp_tokenizer, messages):
    tok = sp_tokenizer
    tok.chat_template = SPACE_TEMPLATE
    expected = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    tok.chat_template = SPACE_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    try:
        example = tokenize_record(_record({"messages": messages}), tok)
        text = tok.apply_chat_template(messages, tokenize=False)
    finally:
        tok.chat_template = None
    assert example.tokens.tolist() == list(expected["input_ids"])
    assert example.tokens.tolist() == tok.encode(text, add_special_tokens=False)
    assert example.mask.astype(int).tolist() == list(expected["assistant_masks"])


class _NoOffsets:
    """A tokenizer seen as a slow (Python) one: no offset mapping."""
    is_fast = False

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_without_offsets_a_boundary_inside_a_token_is_an_error(sp_tokenizer):
    from jlora.data import DataError
    tok = _NoOffsets(sp_tokenizer)
    ok = tokenize_record(_record({"prompt": "Q: What is the capital of France?\nA:",
                                  "completion": " The capital of France is Paris."}), tok)
    reference = tokenize_record(_record({"prompt": "Q: What is the capital of France?\nA:",
                                         "completion": " The capital of France is Paris."}), sp_tokenizer)
    assert ok.tokens.tolist() == reference.tokens.tolist() and ok.mask.tolist() == reference.mask.tolist()
    with pytest.raises(DataError, match="mem.jsonl:1: cannot find where the trained text starts"):
        tokenize_record(_record({"prompt": "A: ", "completion": "Paris"}), tok)
