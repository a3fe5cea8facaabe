"""What `jlora inspect` leaves out of its analysis, one line per kind, so nothing is skipped silently.

The analysis covers delta W = scale * B @ A per module. An adapter file can also hold (REFERENCE.md section 8):
- DoRA magnitude vectors (`lora_magnitude_vector`, [out]): they rescale the rows of W + delta W, so the
  update is not delta W alone;
- `modules_to_save` / saved embedding layers: full trained copies of a module's weight, not low rank;
- LoRA biases (`lora_B.bias`, PEFT `lora_bias=True`) and trainable token rows (`trainable_tokens_*`);
- anything else, named as found.
"""
from __future__ import annotations

KINDS = (  # (kind, test on the key, what it is)
    ("dora", lambda k: "lora_magnitude_vector" in k,
     "DoRA magnitude vectors (rescale the rows of W + delta W; the singular values above are of delta W only)"),
    ("bias", lambda k: ".lora_B.bias" in k or ".lora_A.bias" in k, "LoRA biases"),
    ("tokens", lambda k: "trainable_tokens" in k, "trainable token rows (trainable_token_indices)"),
    ("full", lambda k: "lora_" not in k and k.endswith(".weight"),
     "full weights (modules_to_save or saved embedding layers; trained copies, not low rank)"),
)


def not_analysed(other: dict, config: dict) -> list[str]:
    """One line per kind of tensor in `other` (the adapter's non-LoRA-factor tensors) that was not analysed."""
    groups: dict[str, list[str]] = {}
    for key in sorted(other):
        kind = next((k for k, test, _ in KINDS if test(key)), "other")
        groups.setdefault(kind, []).append(key.removeprefix("base_model.model."))
    if config.get("use_dora") and "dora" not in groups:
        groups["dora"] = []
    lines = []
    for kind, _, what in (*KINDS, ("other", None, "tensors of no known kind")):
        if kind not in groups:
            continue
        keys = groups[kind]
        shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
        if kind == "dora" and not keys:
            shown = "use_dora=true in the config, but no magnitude vectors in the weights file"
        elif kind == "full" and config.get("modules_to_save"):
            shown += f"; modules_to_save={config['modules_to_save']}"
        lines.append(f"not analysed: {what}: {shown}")
    return lines
