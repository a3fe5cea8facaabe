"""`jlora export SRC --out DIR`: an adapter every vLLM serves alike, optionally SVD-cut to --max-lora-rank."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub):
    p = sub.add_parser("export", help="write an adapter that passes vLLM's rules: per-module scales folded into "
                                      "lora_B, optionally cut to --max-lora-rank by SVD; --merge for a full model")
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR", help="a `jlora train` run dir or an adapter dir "
                                                                "(jlora, PEFT, Unsloth)")
    p.add_argument("--out", required=True,
                   help="directory for adapter_config.json + adapter_model.safetensors (+ export_report.json)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="the vLLM server's --max-lora-rank: modules above it are cut to their best rank-N "
                        "approximation (default: no cut, checked against vLLM's default 16)")
    p.add_argument("--merge", action="store_true", help="also write base + delta W as a transformers "
                                                        "checkpoint to OUT/merged (needs the base)")
    p.add_argument("--base", default=None, help="base checkpoint dir (default: the adapter's "
                                                "base_model_name_or_path when it is a local dir)")
    p.add_argument("--no-drift", action="store_true", help="skip the logit-drift check on sample inputs")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (pickle)")
    p.set_defaults(func=run)
    return p


def _base_dir(args, adapter) -> Path | None:
    if args.base:
        return Path(args.base)
    name = adapter.config.get("base_model_name_or_path")
    return Path(name) if name and Path(name).is_dir() else None


def run(args) -> int:
    from jlora.convert.safetensors_io import CheckpointError, write_atomic, write_text_atomic
    from jlora.ranks.adapter import CONFIG_FILE, WEIGHTS_FILE, read_adapter
    from jlora.ranks.export import VLLM_DEFAULT_MAX_LORA_RANK, build_export, export_violations

    def fail(msg):
        print(f"jlora export: error: {msg}", file=sys.stderr)
        return 2

    try:
        adapter = read_adapter(args.source, allow_pickle=args.allow_pickle)
        export = build_export(adapter, args.max_lora_rank)
    except (CheckpointError, ValueError) as e:
        return fail(e)
    out = Path(args.out)
    if out.resolve() == adapter.path.resolve():
        return fail(f"--out {out} is the source adapter dir; choose another directory")
    server = args.max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    problems = export_violations(export, args.max_lora_rank)
    if problems:
        hint = ""
        if args.max_lora_rank is None and any("exceeds --max-lora-rank" in p for p in problems):
            r = export.config["r"]
            hint = (f"\n  (checked against vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}; pass "
                    f"--max-lora-rank N to check against your server's value, and to cut modules above N to rank "
                    f"N by SVD, e.g. --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK} for this rank-{r} adapter)")
        if any(".base_layer.weight" in p for p in problems):
            hint += ("\n  (PEFT saved full embedding weights (`save_embedding_layers`); if the vocabulary was not "
                     "resized, re-save with save_embedding_layers=False)")
        return fail(f"{adapter.path}: vLLM would not serve the export (nothing written):\n  - "
                    + "\n  - ".join(problems) + hint)
    base_dir = _base_dir(args, adapter)
    if args.merge and base_dir is None:
        return fail(f"--merge needs the base model: {adapter.path / CONFIG_FILE} names "
                    f"{adapter.config.get('base_model_name_or_path')!r}, not a local dir; pass --base DIR")

    write_atomic(out / WEIGHTS_FILE, export.tensors, metadata={"format": "pt"})
    write_text_atomic(out / CONFIG_FILE, json.dumps(export.config, indent=2) + "\n")
    cfg = export.config
    print(f"{adapter.path} -> {out}: r={cfg['r']} lora_alpha={cfg['lora_alpha']:g}"
          f"{' use_rslora' if cfg['use_rslora'] else ''}, {len(export.modules)} modules, empty rank/alpha patterns")
    folded = [m for m in export.modules if m.folded]
    if folded:
        print(f"folded the per-module scale of {len(folded)} modules into lora_B")
    cut = [m for m in export.modules if m.truncated]
    if cut:
        energies = sorted(m.energy_kept for m in cut)
        print(f"cut {len(cut)} of {len(export.modules)} modules to rank <= {args.max_lora_rank} by SVD; energy kept "
              f"(||delta W_k||^2 / ||delta W||^2): min {energies[0]:.4%}, median {energies[len(energies) // 2]:.4%}")
        for m in sorted(cut, key=lambda m: m.energy_kept)[:min(len(cut), 8)]:
            print(f"  {m.module}: rank {m.r} -> {m.rank}, energy kept {m.energy_kept:.4%}")
    report = {"source": str(adapter.path), "max_lora_rank": args.max_lora_rank,
              "modules": [vars(m) for m in export.modules]}

    model = None
    changed = bool(cut or folded)
    if base_dir is not None and changed and not args.no_drift:
        from jlora.ranks.drift import logit_drift
        try:
            drift, model = logit_drift(base_dir, adapter.path, out)
        except (CheckpointError, ValueError) as e:
            print(f"logit drift not measured: {e}")
        else:
            report["logit_drift"] = drift
            print(f"logit drift on {drift['samples']} random sequences of {drift['length']} tokens: "
                  f"max |delta logits| {drift['max_abs']:.3g} = {drift['relative']:.3%} of max |logits|, "
                  f"{drift['of_update']:.3%} of the adapter's own change")
    elif changed and not args.no_drift:
        print("logit drift not measured: no local base (pass --base DIR)")
    (out / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")

    if args.merge:
        import jlora
        try:
            if model is None:
                model = jlora.load_adapter(jlora.load_hf(base_dir), out)
            merged = jlora.save_merged(model, out / "merged")
        except (CheckpointError, ValueError) as e:
            return fail(f"--merge: {e}")
        print(f"merged checkpoint: {merged}")
    base_text = str(base_dir.resolve()) if base_dir else cfg.get("base_model_name_or_path") or "BASE"
    print(f"vLLM check passed (--max-lora-rank {server}). Serve it with:\n"
          f"  vllm serve {base_text} --enable-lora --max-lora-rank {server} --lora-modules adapter={out.resolve()}")
    return 0

