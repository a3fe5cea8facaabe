"""PEFT-format adapters out of and into jlora (shared/REFERENCE.md sections 1-2).

Keys: `base_model.model.<HF module>.lora_A.weight` = A^T [r, in] and `.lora_B.weight` = B^T [out, r]; a DoRA
adapter (`use_dora: true`) also `.lora_magnitude_vector` = m [out] (jlora/dora.py), as PEFT saves it.
The config holds only fields PEFT 0.13 knew, with an explicit `target_modules` list, plus PEFT's newer fields
when they are used. Trained embeddings and head (jlora/trainable_tokens.py) as PEFT saves them: full copies
(`modules_to_save`) under `base_model.model.model.embed_tokens.weight` / `base_model.model.lm_head.weight` [vocab,
hidden] (a tied copy under both, with `ensure_weight_tying: true`), token rows (`trainable_token_indices`) under
`<module>.token_adapter.trainable_tokens_delta` [n, hidden].
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jlora.convert.safetensors_io import CheckpointError, iter_tensors, write_atomic

from jlora.atomic_files import write_text
from jlora.dora import MAGNITUDE_KEY
from jlora.llama import LlamaForCausalLM
from jlora.lora_config import LoraConfig
from jlora.models.stacked import on_loop_model
from jlora.module_patterns import HEAD_MODULES, PatternError, head_module
from jlora.peft_model import adapted_modules, get_peft_model, linear_modules
from jlora.trainable_tokens import load_peft_tensors, peft_tensors, untie_head

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def explicit_targets(model: LlamaForCausalLM) -> list[str]:
    """Module-name suffixes when every layer is adapted alike, else the full module names.

    Suffixes are in the order a layer holds its projections (q, k, v, o, gate, up, down; Phi-3: qkv_proj,
    o_proj, gate_up_proj, down_proj)."""
    adapted = [n for n, _ in adapted_modules(model)]
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[1] for n in adapted))
    everywhere = [n for n, _ in linear_modules(model) if n.rsplit(".", 1)[1] in suffixes]
    return suffixes if everywhere == adapted else adapted


def adapter_config(model: LlamaForCausalLM, base_model_name_or_path: str | None = None,
                   revision: str | None = None) -> dict:
    """The adapter_config.json dict, checked to reproduce every module's rank and scaling.

    `revision` is the base's Hub revision (PEFT's field: `from_pretrained` loads the base at it)."""
    cfg: LoraConfig = getattr(model, "lora_config", None) or LoraConfig()
    modules = list(adapted_modules(model))
    if not modules:
        raise ValueError("the model has no LoRA adapters to save: call jlora.get_peft_model first")
    ranks = Counter(m.lora.r for _, m in modules)
    out = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": explicit_targets(model), "bias": "none", "use_rslora": cfg.use_rslora,
        "use_dora": any(m.lora.magnitude is not None for _, m in modules),
        "modules_to_save": None, "init_lora_weights": True,
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "source_dir", None),
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None, "revision": revision,
    }
    if cfg.modules_to_save:
        out["modules_to_save"] = list(cfg.modules_to_save)
        if model.lm_head is None:  # one copy serves both: PEFT ties them when told; a PEFT without that field
            out["modules_to_save"] = list(HEAD_MODULES)  # loads two equal copies (both keys are saved)
            out["ensure_weight_tying"] = True
    if cfg.trainable_token_indices is not None:  # PEFT >= 0.15
        out["trainable_token_indices"] = cfg.trainable_token_indices
    check = LoraConfig(r=out["r"], lora_alpha=out["lora_alpha"], use_rslora=out["use_rslora"],
                       rank_pattern=out["rank_pattern"], alpha_pattern=out["alpha_pattern"])
    for name, m in modules:
        if check.rank_for(name) != m.lora.r or not np.isclose(check.scaling_for(name), m.lora.scaling, rtol=1e-6):
            raise ValueError(f"{name}: adapter r={m.lora.r}, scaling={m.lora.scaling} is not what the config "
                             f"reproduces (r={check.rank_for(name)}, scaling={check.scaling_for(name)}); "
                             f"the model's lora_config no longer describes its adapters ({dict(ranks)})")
    return out


def adapter_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """PEFT key -> float32 array in torch orientation."""
    out = {}
    for name, m in adapted_modules(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = np.asarray(m.lora.a[...], np.float32).T
        out[f"{PREFIX}{name}.lora_B.weight"] = np.asarray(m.lora.b[...], np.float32).T
        if m.lora.magnitude is not None:
            out[f"{PREFIX}{name}.{MAGNITUDE_KEY}"] = np.asarray(m.lora.magnitude[...], np.float32)
    out.update(peft_tensors(model, PREFIX))  # trained embedding/head copies and token rows
    return out


def save_pretrained(model: LlamaForCausalLM, out_dir, *, base_model_name_or_path: str | None = None,
                    revision: str | None = None) -> Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` that PEFT loads and vLLM serves."""
    out_dir = Path(out_dir)
    config = adapter_config(model, base_model_name_or_path, revision)
    write_atomic(out_dir / WEIGHTS_FILE, adapter_tensors(model), metadata={"format": "pt"})
    write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out_dir


def _read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{adapter_dir}: no {CONFIG_FILE} (expected a PEFT LoRA adapter dir)")
    d = json.loads(path.read_text())
    problems = []
    if d.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={d.get('peft_type')!r} (only LORA is supported)")
    if d.get("bias", "none") != "none":
        problems.append(f"bias={d['bias']!r} (only 'none')")
    unknown = [m for m in d.get("modules_to_save") or [] if head_module(m) is None]
    if unknown:
        problems.append(f"modules_to_save={unknown} (jlora trains full copies of embed_tokens and lm_head only)")
    if d.get("layers_to_transform") is not None:
        problems.append("layers_to_transform is set (not supported)")
    if d.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out=true (not a Llama-family layout)")
    if problems:
        raise CheckpointError(f"{path}: unsupported adapter: " + "; ".join(problems))
    return d


def config_from_peft(d: dict, model_type: str = "llama") -> LoraConfig:
    """The LoraConfig of a PEFT adapter_config.json dict for a base of `model_type`: a null
    `target_modules` means PEFT's default for that model_type (`Family.peft_default_targets`; where PEFT
    has none, phi3 and smollm3, it raises "Please specify `target_modules`" and so does jlora rather than
    guess), "all-linear" the family's projections."""
    from jlora.models.registry import FAMILIES

    family = FAMILIES[model_type]
    targets = d.get("target_modules")
    if targets is None:
        if family.peft_default_targets is None:
            raise PatternError(f"target_modules is null, and PEFT has no default targets for model_type "
                               f"{model_type!r} (it raises too); list the modules, e.g. {list(family.target_modules)}")
        targets = list(family.peft_default_targets)
    elif targets == "all-linear":
        targets = list(family.target_modules)
    return LoraConfig(r=int(d.get("r", 8)), lora_alpha=d.get("lora_alpha", 8), lora_dropout=0.0,
                      target_modules=targets, use_rslora=bool(d.get("use_rslora", False)),
                      use_dora=bool(d.get("use_dora", False)),
                      rank_pattern=dict(d.get("rank_pattern") or {}), alpha_pattern=dict(d.get("alpha_pattern") or {}),
                      modules_to_save=d.get("modules_to_save") or None,
                      trainable_token_indices=d.get("trainable_token_indices"))


def read_adapter_weights(adapter_dir: Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The tensors of adapter_model.safetensors (or, with allow_pickle, adapter_model.bin) in adapter_dir."""
    st = adapter_dir / WEIGHTS_FILE
    if st.exists():
        return dict(iter_tensors(st))
    binf = adapter_dir / "adapter_model.bin"
    if binf.exists():
        if not allow_pickle:
            raise CheckpointError(f"{binf}: pickle adapter weights; pass allow_pickle=True if you trust this file")
        import torch
        return {k: v.float().numpy() for k, v in torch.load(binf, map_location="cpu", weights_only=True).items()}
    raise CheckpointError(f"{adapter_dir}: no {WEIGHTS_FILE}")


def _trained_apart(config: LoraConfig, d: dict) -> bool:
    """Whether PEFT trains a tied base's embed_tokens and lm_head apart for this adapter: modules_to_save
    without ensure_weight_tying (PEFT's default), or token rows given per module with different indices."""
    if d.get("ensure_weight_tying"):
        return False
    rows = config.trainable_token_indices
    different_rows = isinstance(rows, dict) and len(rows) == 2 and len(set(map(tuple, rows.values()))) == 2
    return bool(config.modules_to_save) or different_rows


def normalise_key(key: str) -> str:
    """PEFT key -> `<HF module>.lora_A.weight`: the `base_model.model.` prefix dropped, and PEFT's in-memory
    adapter name removed after a LoRA part (`.lora_A.default.weight`, `.lora_embedding_A.default`); a DoRA
    magnitude is `<HF module>.lora_magnitude_vector` (older PEFT: `.lora_magnitude_vector.default.weight`)."""
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    key = re.sub(rf"\.{MAGNITUDE_KEY}(\.default)?(\.weight)?$", f".{MAGNITUDE_KEY}", key)
    return re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.default\b", r".\1", key)


@on_loop_model  # a scanned model: unstacked for the writes, stacked again (jlora.models.stacked)
def load_adapter(model: LlamaForCausalLM, adapter_dir, *, allow_pickle: bool = False,
                 rngs: nnx.Rngs | None = None) -> LlamaForCausalLM:
    """Adds the adapter PEFT, Unsloth or jlora saved in `adapter_dir` to `model` (in place) and returns it."""
    adapter_dir = Path(adapter_dir)
    d = _read_adapter_config(adapter_dir)
    tensors = {normalise_key(k): v for k, v in read_adapter_weights(adapter_dir, allow_pickle).items()}
    try:  # patterns from the file: invalid or too costly ones fail here, before the model changes
        config = config_from_peft(d, model.config.model_type)
        config.check_patterns(n for n, _ in linear_modules(model))
    except (PatternError, ValueError) as e:  # also bad modules_to_save / trainable_token_indices
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: {e}") from None
    if model.lm_head is None and _trained_apart(config, d):
        untie_head(model)  # PEFT trained the tied embedding and head apart: so does the model that loads it
    try:
        model = get_peft_model(model, config, rngs=rngs or nnx.Rngs(0))
    except ValueError as e:  # a token index past the vocabulary
        raise CheckpointError(f"{adapter_dir / CONFIG_FILE}: {e}") from None
    try:
        used = load_peft_tensors(model, tensors, str(adapter_dir))
    except ValueError as e:
        raise CheckpointError(str(e)) from None

    def take(var, key: str, want: tuple, lacks: str, detail: str = "") -> None:
        """var <- tensors[key] (float32, torch orientation -> jlora's: .T, a no-op on a 1-D magnitude), once the
        key is there (else `lacks`) with the shape `want`."""
        if key not in tensors:
            raise CheckpointError(f"{adapter_dir}: {lacks}")
        t = tensors[key]
        if tuple(t.shape) != want:
            raise CheckpointError(f"{adapter_dir}: {PREFIX}{key} has shape {tuple(t.shape)}, the model needs "
                                  f"{want}{detail}; was it trained on another base model?")
        var.set_value(jnp.asarray(np.asarray(t, np.float32).T))
        used.add(key)

    for name, m in adapted_modules(model):
        for part, var, want in (("lora_A", m.lora.a, (m.lora.r, m.in_features)),
                                ("lora_B", m.lora.b, (m.out_features, m.lora.r))):
            key = f"{name}.{part}.weight"
            take(var, key, want, f"adapter lacks {PREFIX}{key} that its config targets",
                 f" (r={m.lora.r}, in={m.in_features}, out={m.out_features})")
        if m.lora.magnitude is not None:
            key = f"{name}.{MAGNITUDE_KEY}"
            take(m.lora.magnitude, key, (m.out_features,),
                 f"the config says use_dora=true but the adapter lacks {PREFIX}{key} (DoRA's magnitude vector)")
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{adapter_dir}: tensors this model has no place for: {extra[:10]}"
                              f"{' ...' if len(extra) > 10 else ''}")
    model.adapter_source = str(adapter_dir)
    return model
