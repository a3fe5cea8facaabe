"""The `jlora ranks` report: per target preset, one row per rank with parameters and memory."""
from __future__ import annotations

from jlora.llama_config import LlamaConfig
from jlora.memory import format_bytes
from jlora.ranks.advice import max_lora_rank
from jlora.ranks.memory import (ADAPTER_STATE_BYTES_PER_PARAM, GRADIENT_BYTES_PER_PARAM, activation_bytes,
                                adapter_state_bytes, base_weight_bytes)
from jlora.ranks.params import (TABLE_RANKS, TABLE_TARGETS, base_parameter_count, lora_parameter_count,
                                target_suffixes, trainable_percent)


def rank_rows(config: LlamaConfig, *, targets=TABLE_TARGETS, ranks=TABLE_RANKS, batch: int = 8, seq: int = 512,
              dtype: str = "bfloat16") -> list[dict]:
    """One dict per (targets, r): trainable, percent, adapter_state_bytes, activation_bytes(_remat), vllm."""
    rows = []
    for t in targets:
        if targets is TABLE_TARGETS and not _applies(t, config):
            continue  # "qv" on Phi-3: q and v are parts of one fused qkv_proj
        for r in ranks:
            n = lora_parameter_count(config, r, t)
            kw = dict(batch=batch, seq=seq, r=r, targets=t, dtype=dtype)
            rows.append({"targets": t, "r": r, "trainable": n, "percent": trainable_percent(config, n),
                         "adapter_state_bytes": adapter_state_bytes(n),
                         "activation_bytes": activation_bytes(config, **kw),
                         "activation_bytes_remat": activation_bytes(config, remat=True, **kw),
                         "max_lora_rank": max_lora_rank(r)})
    return rows


def _applies(targets: str, config: LlamaConfig) -> bool:
    try:
        target_suffixes(targets, config)
    except ValueError:
        return False
    return True


def format_report(config: LlamaConfig, name: str, rows: list[dict], *, batch: int, seq: int, dtype: str,
                  quantize: str | None) -> list[str]:
    c = config
    total = base_parameter_count(c)
    weights = base_weight_bytes(c, dtype, quantize)
    lines = [
        f"{name}: {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size:,}, MLP {c.intermediate_size:,}, "
        f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, vocab {c.vocab_size:,}",
        f"base: {total:,} parameters; weights {format_bytes(weights)} "
        + (f"(NF4 projections, {dtype} embeddings/head/norms)" if quantize else f"in {dtype}"),
        f"adapter+Adam: float32 A, B and AdamW's two moments, {ADAPTER_STATE_BYTES_PER_PARAM} bytes per trainable "
        f"parameter (+{GRADIENT_BYTES_PER_PARAM} of float32 gradients and their accumulator during a step)",
        f"activations: ESTIMATE for batch {batch} x seq {seq} in {dtype} (formula in jlora/ranks/memory.py); "
        f"--remat keeps one input per layer and recomputes the rest",
    ]
    header = ("r", "trainable", "% of model", "adapter+Adam", "activations", "with --remat", "vllm --max-lora-rank")
    for t in dict.fromkeys(row["targets"] for row in rows):
        part = [row for row in rows if row["targets"] == t]
        per_rank = lora_parameter_count(c, 1, t)
        lines += ["", f"targets {t} ({', '.join(target_suffixes(t, c))}): {per_rank:,} trainable parameters per unit of r"]
        cells = [header] + [(str(row["r"]), f"{row['trainable']:,}", f"{row['percent']:.4f}%",
                             format_bytes(row["adapter_state_bytes"]), format_bytes(row["activation_bytes"]),
                             format_bytes(row["activation_bytes_remat"]), str(row["max_lora_rank"]))
                            for row in part]
        widths = [max(len(cell[i]) for cell in cells) for i in range(len(header))]
        for cell in cells:
            lines.append("  " + "  ".join(x.rjust(w) for x, w in zip(cell, widths)))
    lines.append("")
    lines.append(f"peak memory ~ weights + adapter+Adam + gradients + activations "
                 f"(e.g. r=16 all-linear: {format_bytes(_peak(rows, weights, 16, False))}, "
                 f"{format_bytes(_peak(rows, weights, 16, True))} with --remat)"
                 if any(row["r"] == 16 and row["targets"] == "all-linear" for row in rows) else
                 "peak memory ~ weights + adapter+Adam + gradients + activations")
    return lines


def _peak(rows, weights, r, remat):
    row = next(x for x in rows if x["r"] == r and x["targets"] == "all-linear")
    act = row["activation_bytes_remat" if remat else "activation_bytes"]
    return weights + row["adapter_state_bytes"] + row["trainable"] * GRADIENT_BYTES_PER_PARAM + act
