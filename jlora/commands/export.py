"""`jlora export SRC --out DIR`: an adapter every vLLM serves alike, optionally SVD-cut to --max-lora-rank.

Everything (adapter, export_report.json, merged/) is written into a temporary sibling of DIR and swapped
in as a whole (jlora.atomic_files.atomic_directory): DIR holds one complete export, and any failure (a
drift check against the wrong base, --merge running out of disk) leaves DIR as it was. DIR may be new,
empty or a previous jlora export (it holds export_report.json); anything else needs --overwrite.

A DoRA adapter (use_dora=true) is no adapter vLLM serves: without --merge the export says so in one line and
offers --merge; with --merge it writes only DIR/merged (PEFT's DoRA merge) and export_report.json.
"""
from __future__ import annotations

import sys
from pathlib import Path


def register(sub):
    from jlora.commands.help_format import examples
    p = sub.add_parser("export", help="write an adapter that passes vLLM's rules: per-module scales folded into "
                                      "lora_B, optionally cut to --max-lora-rank by SVD; --merge for a full model",
                       epilog=examples(
                           "jlora export runs/x --out runs/x/vllm --max-lora-rank 16   # for vllm --max-lora-rank 16",
                           "jlora export runs/x --out runs/x/export --merge --dtype bfloat16",
                           "jlora export runs/x --out model.gguf --gguf q8_0 --ollama"))
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR", help="a `jlora train` run dir or an adapter dir "
                                                                "(jlora, PEFT, Unsloth)")
    p.add_argument("--out", required=True,
                   help="directory for adapter_config.json + adapter_model.safetensors + export_report.json; "
                        "replaced as a whole: it must be new, empty or a previous jlora export (else --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a previous export")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="the vLLM server's --max-lora-rank: modules above it are cut to their best rank-N "
                        "approximation (default: no cut, checked against vLLM's default 16)")
    p.add_argument("--max-drift", type=float, default=None, metavar="PCT",
                   help="acceptable logit drift, in percent of max |logits| (default 1)")
    p.add_argument("--merge", action="store_true", help="also write base + delta W as a transformers "
                                                        "checkpoint to OUT/merged (needs the base)")
    p.add_argument("--base", default=None, help="base checkpoint dir or Hugging Face Hub id (default: the adapter's "
                                                "base_model_name_or_path (+ revision): a local dir, or a Hub id "
                                                "taken from the HF cache first)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype of the --merge checkpoint (default: the base's config.json torch_dtype)")
    p.add_argument("--no-drift", action="store_true", help="skip the logit-drift check on sample inputs")
    p.add_argument("--allow-pickle", action="store_true", help="read adapter_model.bin (pickle)")
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   help="write the merged model as one llama.cpp GGUF file at --out (e.g. model.gguf) instead of "
                        "an adapter: f16, bf16, q8_0, q4_0, q4_k_m or f32 (needs the base; pip install 'jlora[gguf]')")
    p.add_argument("--ollama", action="store_true", help="with --gguf: also write an Ollama Modelfile beside it")
    p.set_defaults(func=run)
    return p


def run_gguf(args) -> int:
    """--gguf: source (an adapter/run dir + its base, or a merged checkpoint dir) -> merged -> one GGUF file."""
    import tempfile

    from jlora.convert.safetensors_io import CheckpointError
    try:
        from jlora.convert.gguf_export import GGUFExportError, check_type, export_gguf, read_chat_template
        from jlora.convert.ollama import write_modelfile
    except ImportError:
        print("jlora export: error: --gguf needs the gguf package: pip install 'jlora[gguf]'", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        kind = check_type(args.gguf)
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; with --gguf it names the file to write, e.g. {out}/model.gguf")
        source = Path(args.source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".jlora-gguf-", dir=out.resolve().parent) as tmp:
            if (source / "config.json").is_file() and not (source / "adapter_config.json").is_file():
                merged = source  # already a full checkpoint (e.g. export --merge's merged/)
            else:
                import jlora
                from jlora.ranks.adapter import read_adapter
                adapter = read_adapter(source, allow_pickle=args.allow_pickle)
                base_dir, note = _base_dir(_as_merge(args), adapter)
                if base_dir is None:
                    raise ValueError(f"--gguf needs the base model ({note}); pass --base DIR")
                dtype = merge_dtype(args, base_dir)
                print(f"merging {adapter.path} into {base_dir} ({dtype}) ...", flush=True)
                model = jlora.load_adapter(jlora.load_hf(base_dir, dtype=dtype), adapter.path)
                merged = jlora.save_merged(model, Path(tmp) / "merged", dtype=dtype)
            print(f"writing {kind} GGUF ...", flush=True)
            export_gguf(merged, out, kind, name=out.stem)
            template = read_chat_template(merged)
        lines = [f"GGUF ({kind}): {out}"]
        if args.ollama:
            lines.append(f"Ollama Modelfile: {write_modelfile(out, template)} "
                         f"(cd {out.parent} && ollama create NAME -f Modelfile)")
    except (CheckpointError, GGUFExportError, ValueError, OSError) as e:
        print(f"jlora export: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def merged_only_reason(config: dict) -> str | None:
    """Why vLLM cannot serve this adapter at all (so the only export is the merged model), or None: the
    fields jlora.vllm_rules.merged_only_fields finds, in words."""
    from jlora.vllm_rules import merged_only_fields

    fields = merged_only_fields(config)
    if "use_dora" in fields:
        return "a DoRA adapter (use_dora=true, lora_magnitude_vector weights)"
    if fields:
        shown = ", ".join(f"{k}={v}" for k, v in fields.items())
        return f"an adapter with a trained embedding/head ({shown}; vLLM loads no such weights, nor added tokens)"
    return None


def run_dora(args, adapter) -> int:
    """A DoRA adapter, or one with a trained embedding/head: vLLM refuses it, so the only export is the merged
    model (--merge)."""
    from jlora.atomic_files import atomic_directory, write_json
    from jlora.convert.safetensors_io import CheckpointError
    from jlora.ranks.export import REPORT_FILE

    def fail(msg):
        print(f"jlora export: error: {msg}", file=sys.stderr)
        return 2

    reason = merged_only_reason(adapter.config)
    if not args.merge:
        return fail(f"{adapter.path} is {reason}, which vLLM cannot serve: export the merged model instead with "
                    f"--merge (OUT/merged, vllm serve OUT/merged), or --gguf TYPE for llama.cpp")
    out = Path(args.out)
    try:
        base_dir, note = _base_dir(args, adapter)
    except CheckpointError as e:
        return fail(f"--base: {e}")
    if base_dir is None:
        return fail(f"--merge needs the base model ({note}); pass --base DIR")
    problem = _out_problem(out, adapter.path, base_dir, args.overwrite)
    if problem:
        return fail(problem)
    import jlora
    dtype = merge_dtype(args, base_dir)
    print(f"merging {adapter.path} into {base_dir} ({dtype}) ...", flush=True)
    try:
        with atomic_directory(out) as tmp:
            model = jlora.load_adapter(jlora.load_hf(base_dir, dtype=dtype), adapter.path,
                                       allow_pickle=args.allow_pickle)
            jlora.save_merged(model, tmp / "merged", dtype=dtype)
            write_json(tmp / REPORT_FILE, {"written_by": "jlora export", "source": str(adapter.path),
                                           "base": str(base_dir), "use_dora": bool(adapter.config.get("use_dora")),
                                           "merged_dtype": dtype,
                                           "adapter": f"not written: vLLM does not serve {reason}", "modules": []})
    except (CheckpointError, ValueError, OSError) as e:
        return fail(f"{e} (nothing written: {out} is as it was)")
    print(f"{reason[0].upper()}{reason[1:]}: vLLM cannot serve it, so no adapter was written\n"
          f"merged checkpoint ({dtype}): {out / 'merged'}\nServe it with:\n  vllm serve {(out / 'merged').resolve()}")
    return 0


def _as_merge(args):
    """args as the base lookup sees them for a merge (the base is needed: fetch a Hub id if not cached)."""
    import copy
    merged = copy.copy(args)
    merged.merge = True
    return merged


def _base_dir(args, adapter) -> tuple[Path | None, str | None]:
    """(the base's local directory, None), or (None, "base not verified: why") when no base can be had.
    --base and a Hub id the adapter names are resolved by jlora.convert.hub.resolve_model, cache first;
    the Hub is asked only when the base will be used (the drift check or --merge)."""
    from jlora.convert.hub import resolve_model
    from jlora.ranks.drift import named_base
    if args.base:
        return resolve_model(args.base, cache_first=True), None  # raises CheckpointError naming it
    base_dir, missing = named_base(adapter, fetch=args.merge or not args.no_drift)
    return base_dir, f"base not verified: {missing}" if missing else None


def merge_dtype(args, base_dir: Path) -> str:
    """--dtype, else the base's config.json torch_dtype (`dtype` in newer transformers), else float32."""
    from jlora.ranks.drift import _config
    hf = _config(base_dir) or {}
    named = args.dtype or hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return named if named in ("float32", "bfloat16", "float16") else "float32"


def _inside(path: Path, parent: Path) -> bool:
    return path.resolve() == parent.resolve() or parent.resolve() in path.resolve().parents


def _out_problem(out: Path, adapter_dir: Path, base_dir: Path | None, overwrite: bool) -> str | None:
    from jlora.ranks.export import REPORT_FILE, is_previous_export
    for what, path in (("the source adapter dir", adapter_dir), ("the base model dir", base_dir)):
        if path is not None and _inside(path, out):
            return f"--out {out} is or contains {what} {path}, which the export would replace; choose another directory"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; expected a directory"
    if out.is_dir() and any(out.iterdir()) and not is_previous_export(out) and not overwrite:
        return (f"--out {out} is not empty and holds no {REPORT_FILE} (not a previous jlora export); "
                f"the export replaces the whole directory: pass --overwrite to replace it, or choose another")
    return None


def run(args) -> int:
    from jlora.atomic_files import atomic_directory, write_json
    from jlora.convert.safetensors_io import CheckpointError
    from jlora.ranks.adapter import read_adapter
    from jlora.ranks.export import (REPORT_FILE, VLLM_DEFAULT_MAX_LORA_RANK, build_export, export_violations,
                                    write_export)
    from jlora.ranks.verdict import DRIFT_THRESHOLD, recommend_max_lora_rank, verdict, verdict_lines

    def fail(msg):
        print(f"jlora export: error: {msg}", file=sys.stderr)
        return 2

    if args.gguf is not None:
        return run_gguf(args)
    if args.ollama:
        return fail("--ollama goes with --gguf TYPE (the Modelfile points at the GGUF file)")

    if args.max_drift is not None and not args.max_drift > 0:
        return fail(f"--max-drift must be a positive percentage, got {args.max_drift}")
    threshold = DRIFT_THRESHOLD if args.max_drift is None else args.max_drift / 100
    try:
        adapter = read_adapter(args.source, allow_pickle=args.allow_pickle)
        if merged_only_reason(adapter.config):  # DoRA, a trained embedding/head: only the merged model
            return run_dora(args, adapter)
        export = build_export(adapter, args.max_lora_rank)
    except (CheckpointError, ValueError) as e:
        return fail(e)
    out = Path(args.out)
    try:
        base_dir, base_note = _base_dir(args, adapter)
    except CheckpointError as e:
        return fail(f"--base: {e}")
    problem = _out_problem(out, adapter.path, base_dir, args.overwrite)
    if problem:
        return fail(problem)
    server = args.max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    problems = export_violations(export, args.max_lora_rank)
    if problems:
        hint = ""
        if args.max_lora_rank is None and any("exceeds --max-lora-rank" in p for p in problems):
            r = export.config["r"]
            hint = (f" (checked against vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}; pass "
                    f"--max-lora-rank N to check against your server's value, and to cut modules above N to rank "
                    f"N by SVD, e.g. --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK} for this rank-{r} adapter)")
        if any(".base_layer.weight" in p for p in problems):
            hint += (" (PEFT saved full embedding weights (`save_embedding_layers`); if the vocabulary was not "
                     "resized, re-save with save_embedding_layers=False)")
        return fail(f"{adapter.path}: vLLM would not serve the export (nothing written): "
                    + "; ".join(problems) + hint)
    if args.merge and base_dir is None:
        return fail(f"--merge needs the base model ({base_note}); pass --base DIR")

    cfg = export.config
    lines = [f"{adapter.path} -> {out}: r={cfg['r']} lora_alpha={cfg['lora_alpha']:g}"
             f"{' use_rslora' if cfg['use_rslora'] else ''}, {len(export.modules)} modules, empty rank/alpha patterns"]
    folded = [m for m in export.modules if m.folded]
    if folded:
        lines.append(f"folded the per-module scale of {len(folded)} modules into lora_B")
    cut = [m for m in export.modules if m.truncated]
    if cut:
        energies = sorted(m.energy_kept for m in cut)
        lines.append(f"cut {len(cut)} of {len(export.modules)} modules to rank <= {args.max_lora_rank} by SVD; "
                     f"energy kept (||delta W_k||^2 / ||delta W||^2): min {energies[0]:.4%}, "
                     f"median {energies[len(energies) // 2]:.4%}")
    report = {"written_by": "jlora export", "source": str(adapter.path), "base": str(base_dir) if base_dir else None,
              "base_model_name_or_path": cfg.get("base_model_name_or_path"), "max_lora_rank": args.max_lora_rank,
              "modules": [vars(m) for m in export.modules]}
    drift = recommended = None
    base_checked = base_dir is None  # no base: its note says why
    try:
        with atomic_directory(out) as tmp:
            write_export(export, tmp)
            probe = None
            embedding = [m.name for m in adapter.modules if m.embedding]
            if base_dir is not None and not args.no_drift and embedding:
                lines.append(f"logit drift not measured: jlora's model cannot apply the embedding adapter on "
                             f"{embedding[0]}")
            elif base_dir is not None and not args.no_drift:
                from jlora.ranks.drift import DriftProbe
                print(f"measuring logit drift on {base_dir} ...", flush=True)
                probe = DriftProbe(base_dir, adapter)
                base_note, base_checked = probe.base_note, True
                if export.folded or export.truncated:
                    drift = report["logit_drift"] = probe.measure(tmp)
                    lines.append(f"logit drift on {drift['samples']} random sequences of {drift['length']} tokens: "
                                 f"max |delta logits| {drift['max_abs']:.3g} = {drift['relative']:.3%} of max "
                                 f"|logits|, {drift['of_update']:.3%} of the adapter's own change")
                known = {args.max_lora_rank: drift["relative"]} if drift and export.truncated else {}
                recommended = recommend_max_lora_rank(adapter, probe, threshold, known)
            elif not args.no_drift and (export.folded or export.truncated):
                lines.append(f"logit drift not measured: no local base ({base_note}; pass --base DIR)")
            model = None
            if args.merge and probe is None:
                import jlora
                from jlora.ranks.drift import check_base
                dtype = merge_dtype(args, base_dir)
                model = jlora.load_hf(base_dir, dtype=dtype)
                base_note, base_checked = check_base(adapter, base_dir, model), True
            report["verdict"] = verdict(export, drift, threshold, recommended, base_note, base_checked)
            lines += verdict_lines(report["verdict"])
            if args.merge:
                import jlora
                print(f"merging into {base_dir} ...", flush=True)
                # the probe's float32 copy holds a 16-bit base exactly; the sum W + delta W is float32 either way
                model = jlora.load_adapter(model, tmp) if probe is None else probe.with_adapter(tmp)
                dtype = report["merged_dtype"] = merge_dtype(args, base_dir)
                jlora.save_merged(model, tmp / "merged", dtype=dtype)
                lines.append(f"merged checkpoint ({dtype}): {out / 'merged'}")
            write_json(tmp / REPORT_FILE, report)
    except (CheckpointError, ValueError, OSError) as e:
        return fail(f"{e} (nothing written: {out} is as it was)")
    print("\n".join(lines))
    named = cfg.get("base_model_name_or_path")
    from jlora.convert.hub import is_hub_id
    hub_base = not args.base and named and is_hub_id(named) and not Path(named).is_dir()
    base_text = named if hub_base else str(base_dir.resolve()) if base_dir else named or "BASE"
    if hub_base and cfg.get("revision"):
        base_text += f" --revision {cfg['revision']}"
    caveat = " (but see the verdict: the drift is not acceptable)" if report["verdict"]["acceptable"] is False else ""
    print(f"vLLM check passed (--max-lora-rank {server}){caveat}. Serve it with:\n"
          f"  vllm serve {base_text} --enable-lora --max-lora-rank {server} --lora-modules adapter={out.resolve()}")
    return 0
