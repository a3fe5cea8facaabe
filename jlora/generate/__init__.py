"""Generation: a preallocated KV cache, a jitted prefill and decode loop, sampling, text in and out.

    cache.py     KVCache: per layer keys [b, kv_heads, d, max_len], values [b, kv_heads, max_len, d]; the model's
                 attention writes and reads it
    sampler.py   greedy / temperature / top-k / top-p / repetition penalty, seeded, in float32
    decode.py    token ids in, token ids out: left padding, prompt buckets, per-row eos stop
    api.py       `generate(model, tokenizer, prompts, ...)`: tokenize (chat templates), decode, detokenize
    multi_lora.py  several adapters in one batch: per-row gathered A/B (`adapters=`, `adapter_ids=`)

    out = jlora.generate(model, tokenizer, ["What is LoRA?"], max_new_tokens=64)   # this package, called

`jlora.generate` is both this package and the function: the package's module object is callable
(its class is set below), because a package and a function of the same name on `jlora` cannot coexist:
importing any `jlora.generate.*` module would rebind `jlora.generate` to the package.
"""
import sys
import types

from jlora.generate.api import Completion as Completion
from jlora.generate.api import generate as generate
from jlora.generate.cache import KVCache as KVCache
from jlora.generate.decode import TokenOutput as TokenOutput
from jlora.generate.decode import generate_tokens as generate_tokens
from jlora.generate.sampler import SamplingConfig as SamplingConfig


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """generate(*args, **kwargs)."""
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
