"""The embedded default base model: a tiny random Llama plus the bundled tokenizer, as a real HF checkpoint.

Built locally and deterministically (same bytes every time), so `jlora train` with no `--model`
runs end to end on a laptop CPU, and PEFT can load the resulting adapter onto it.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128,
                      intermediate_size=352, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, initializer_range=0.02, torch_dtype="float32",
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_default_base(out_dir, seed: int = 0) -> Path:
    """Writes tokenizer files, config.json and model.safetensors of the default base to `out_dir`."""
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jlora.convert.merged import save_merged
    from jlora.default.tokenizer import build_tokenizer
    from jlora.llama import init_random
    from jlora.llama_config import LlamaConfig

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists():
        return out_dir
    vocab = build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    hf = dict(DEFAULT_CONFIG, vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    model = init_random(LlamaConfig.from_hf_dict(hf), seed=seed)
    # With std 0.02 the frozen random head caps every logit near 2.6 and the loss near 3.7 nats, above half
    # of ln(vocab); std 1/sqrt(hidden) gives unit-scale logits that LoRA can steer.
    hidden = hf["hidden_size"]
    head = jax.random.normal(jax.random.key(seed + 1), (hidden, vocab), jnp.float32) / hidden ** 0.5
    model.lm_head.kernel.set_value(head)
    model.source_dir = str(out_dir)  # save_merged replaces out_dir as a whole: carry the tokenizer over
    save_merged(model, out_dir)
    return out_dir
