"""How far an exported adapter's logits are from the original's, on random token sequences.

    drift    = max |logits(base + exported) - logits(base + original)|
    relative = drift / max |logits(base + original)|
    of_update = drift / max |logits(base + original) - logits(base)|   (share of the adapter's own effect)

The base is loaded once (float32: a bf16 or fp16 base converts exactly); base and original logits are computed once; each export measured
is swapped onto the same base (jlora.load_adapter).

The base must be the one the adapter was trained on, or the numbers mean nothing. `check_base` refuses:
- an adapted module the base lacks, or whose [out, in] differs from the adapter's factors;
- when the adapter's `base_model_name_or_path` names another base (a local directory, or a Hub id with its
  `revision` found in the Hugging Face cache, `named_base`): a base whose config.json
  differs from that one's in an architecture field (ARCH_FIELDS), or whose dense FINGERPRINT tensors
  (the final norm and the first FINGERPRINT_ROWS embedding rows: 16-bit in every layout, bitsandbytes
  4-bit included) differ by more than FINGERPRINT_TOL of their largest magnitude. A copy of the same
  model in another dtype (bf16 rounds by 2^-8) passes; a fine-tune that left those tensors as they were
  (a merged LoRA) cannot be told apart.
When the named base cannot be found (no such directory, a Hub id not in the cache), nothing is compared:
`check_base` returns a "base not verified" note, which the export's verdict carries.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jlora.convert.hf_checkpoint import read_config
from jlora.convert.safetensors_io import CheckpointError

ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_theta",
               "rope_scaling", "rms_norm_eps", "sliding_window")


FINGERPRINT = ("model.norm.weight", "model.embed_tokens.weight")
FINGERPRINT_ROWS = 64
FINGERPRINT_TOL = 2.0 ** -7


def _fingerprint(model_dir: Path) -> dict[str, np.ndarray]:
    """FINGERPRINT tensors (their first FINGERPRINT_ROWS rows) in float64; {} where they cannot be read."""
    from safetensors import SafetensorError, safe_open

    from jlora.convert.hf_checkpoint import weight_files
    out = {}
    try:
        for f in weight_files(model_dir, allow_pickle=False):
            with safe_open(str(f), framework="numpy") as h:
                for name in set(FINGERPRINT) & set(h.keys()):
                    part = h.get_slice(name)
                    out[name] = np.asarray(part[:min(FINGERPRINT_ROWS, part.get_shape()[0])], np.float64)
    except (CheckpointError, SafetensorError, OSError, ValueError, TypeError):
        return {}
    return out


def _drop_adapters(model) -> None:
    from jlora.peft_model import adapted_modules
    for _, m in list(adapted_modules(model)):
        m.lora = None


def _config(path: Path) -> dict | None:
    """The checkpoint's config.json (convert's reader), or None where there is none to read."""
    try:
        return read_config(path)
    except (CheckpointError, OSError):
        return None


def named_base(adapter, *, fetch: bool = False) -> tuple[Path | None, str | None]:
    """(the local directory of the base `adapter` names, None) or (None, why it cannot be had).

    A Hub id (with the config's `revision`) is looked up in the HF cache; `fetch` also asks the Hub
    when it is not cached (jlora.convert.hub.resolve_model).
    """
    from jlora.convert.hub import hub_reference, resolve_model
    where = adapter.path / "adapter_config.json"
    named = adapter.config.get("base_model_name_or_path")
    if not named:
        return None, f"{where} names no base_model_name_or_path"
    if Path(named).is_dir():
        return Path(named), None
    ref = hub_reference(named, adapter.config.get("revision"))
    if ref is None:
        return None, f"{where} names {named!r}, which is neither a local directory nor a Hugging Face Hub id"
    try:
        return resolve_model(ref, cache_first=fetch, cache_only=not fetch), None
    except CheckpointError as e:
        return None, f"{where} names {ref!r}, which could not be found: {e}"


def check_base(adapter, base_dir, model) -> str | None:
    """Raises CheckpointError when `base_dir` (loaded as `model`) is not a base `adapter` fits (module docstring);
    returns a "base not verified: ..." note when the base the adapter names cannot be found, else None."""
    from jlora.peft_model import linear_modules
    base_dir = Path(base_dir)
    named = adapter.config.get("base_model_name_or_path")
    trained_on, missing = named_base(adapter)
    note = f"base not verified: {missing}" if missing else None
    if trained_on is not None and trained_on.resolve() != base_dir.resolve():
        want, got = _config(trained_on), _config(base_dir)
        if want is not None and got is not None:
            diff = [f"{k}: {want.get(k)!r} vs {got.get(k)!r}" for k in ARCH_FIELDS if want.get(k) != got.get(k)]
            if diff:
                raise CheckpointError(
                    f"--base {base_dir} is not the base {adapter.path / 'adapter_config.json'} names "
                    f"({named}): config.json differs in {'; '.join(diff)}")
        want, got = _fingerprint(trained_on), _fingerprint(base_dir)
        for name in sorted(set(want) & set(got)):
            w, g = want[name], got[name]
            gap = float(np.abs(w - g).max()) if w.shape == g.shape else float("inf")
            if not gap <= FINGERPRINT_TOL * float(np.abs(w).max()):
                raise CheckpointError(
                    f"--base {base_dir} is not the base {adapter.path / 'adapter_config.json'} names ({named}): "
                    f"{name} differs (max |difference| {gap:.3g}, max |value| {float(np.abs(w).max()):.3g}); "
                    f"pass --base {named}, or --no-drift to export without the drift check")
    shapes = {n: (m.out_features, m.in_features) for n, m in linear_modules(model)}
    for m in adapter.modules:
        want = (m.b.shape[0], m.a.shape[1])
        if m.embedding:
            raise CheckpointError(f"{adapter.path}: {m.name} is an embedding adapter, which jlora's model cannot "
                                  f"apply (the logit-drift check and --merge need it): pass --no-drift, no --merge")
        if m.name not in shapes:
            raise CheckpointError(f"--base {base_dir} has no module {m.name} that {adapter.path} adapts "
                                  f"(the base has {model.config.num_hidden_layers} layers); wrong base?")
        if shapes[m.name] != want:
            raise CheckpointError(f"--base {base_dir}: {m.name} is [out, in] = {list(shapes[m.name])}, the adapter's "
                                  f"factors need {list(want)}; was {adapter.path} trained on another base?")
    return note


class DriftProbe:
    """Logits of the base and of base + original adapter on fixed random token ids; `measure` an export."""

    def __init__(self, base_dir, adapter, *, samples: int = 4, length: int = 32, seed: int = 0):
        import jlora

        self.model = jlora.load_hf(Path(base_dir), dtype="float32")
        self.base_note = check_base(adapter, base_dir, self.model)
        self.samples, self.length = samples, length
        self.ids = np.random.RandomState(seed).randint(0, self.model.config.vocab_size, (samples, length))
        self.base = np.asarray(self.model(self.ids), np.float64)
        self.original = np.asarray(self.with_adapter(adapter.path)(self.ids), np.float64)

    def with_adapter(self, adapter_dir):
        """The base model carrying (only) the adapter in `adapter_dir`."""
        import jlora
        _drop_adapters(self.model)
        return jlora.load_adapter(self.model, Path(adapter_dir))

    def measure(self, exported_dir) -> dict:
        exported = np.asarray(self.with_adapter(exported_dir)(self.ids), np.float64)
        drift = float(np.abs(exported - self.original).max())
        update = float(np.abs(self.original - self.base).max())
        return {"samples": self.samples, "length": self.length, "max_abs": drift,
                "relative": drift / max(float(np.abs(self.original).max()), 1e-30),
                "of_update": drift / update if update > 0 else 0.0}


def logit_drift(base_dir, original_dir, exported_dir, *, samples: int = 4, length: int = 32, seed: int = 0
                ) -> tuple[dict, object]:
    """(drift report, the base model carrying the exported adapter) for reuse by --merge."""
    from jlora.ranks.adapter import read_adapter
    probe = DriftProbe(base_dir, read_adapter(original_dir), samples=samples, length=length, seed=seed)
    return probe.measure(exported_dir), probe.model
