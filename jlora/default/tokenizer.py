"""A small byte-level BPE tokenizer trained on the bundled demo data."""

import json

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jlora.default.dataset import dataset_paths

VOCAB_SIZE = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLES]

# Each turn is "<|role|>\n{content}"; assistant turns end in EOS, other turns in "\n".
# The {% generation %} block marks assistant tokens for transformers'
# `return_assistant_tokens_mask`; jlora.data finds the same spans without it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _corpus():
    """Yields the prompt and completion texts of the bundled training file."""
    train_path, _ = dataset_paths()
    with open(train_path, encoding="utf-8") as f:
        for line in f:
            example = json.loads(line)
            yield example["prompt"] + example["completion"]


def _train_backend():
    """Trains the `tokenizers` BPE model; deterministic across runs, hash seeds and threads."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def build_tokenizer(out_dir) -> int:
    """Trains the demo tokenizer and saves it with ``save_pretrained`` to ``out_dir``.

    Byte-level BPE (digits split one per token) with 512 entries, special tokens
    ``<pad> <s> </s> <|system|> <|user|> <|assistant|>``, BOS added by the post-processor
    (like Llama), and a chat template. The files are byte-identical on every run and load
    offline with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.

    Returns:
      The vocabulary size, ``len(tokenizer)``.

    Example:
      >>> n = build_tokenizer("/tmp/tok")  # doctest: +SKIP
      >>> transformers.AutoTokenizer.from_pretrained("/tmp/tok")("Q: hi")["input_ids"][0]
      1
    """
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_backend(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLES),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)
