"""A Plan as text for people and as JSON for scripts (`fits` and `bytes_per_chip` always present).

`bytes_per_chip` is device memory (HBM); `host_bytes_per_chip` is the pinned host memory that remat
"offload" keeps the layer inputs in, reported apart and never counted against HBM."""
from __future__ import annotations

import dataclasses

from jlora.plan.planner import Attempt, Plan, mesh_text

GiB = 1 << 30


def gib(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.1f} MiB"


def flop(n: float) -> str:
    return f"{n / 1e12:,.1f} TFLOP" if n >= 1e12 else f"{n / 1e9:,.2f} GFLOP"


def step_time(s: float) -> str:
    return f"{s:.3f} s" if s >= 0.01 else f"{s * 1e3:.3f} ms"


def seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s // 60:.0f} min {s % 60:.0f} s"


def _source(a: Attempt) -> str:
    if a.source == "compiled":
        return f"compiled ({seconds(a.compile_seconds)})"
    if a.source == "refused by the compiler":
        return f"compiler: out of memory ({seconds(a.compile_seconds)})"
    return a.source


def format_text(plan: Plan) -> str:
    r, t, a = plan.request, plan.topology, plan.chosen
    hbm = plan.hbm_bytes_per_chip
    base = "NF4" if plan.quantize else r.dtype
    lines = [
        f"jlora plan: {r.model}, LoRA r={r.r} on {r.targets} ({plan.trainable_params:,} trainable of "
        f"{plan.total_params:,}), {base} base weights",
        f"topology {t.name}: {t.chips} x {t.chip.name}, {gib(hbm)} HBM, {t.chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{t.chip.hbm_bandwidth / 1e9:,.0f} GB/s per chip",
        f"step: {a.batch_size} x {a.seq_len or r.seq_len} tokens"
        + (f" x {r.grad_accum} micro-batches" if r.grad_accum > 1 else "") + f", mesh {mesh_text(a.mesh)}",
        f"attention {plan.attention}, loss "
        + (f"in chunks of {r.loss_chunk_tokens:,} tokens" if r.loss_chunk_tokens else "over the whole logits"),
    ]
    if r.kernels:
        calls = "" if a.kernel_calls is None else f": {a.kernel_calls} Mosaic (Pallas) kernel call sites in the step"
        lines.append(f"kernels: {r.kernels}{calls}")
    if plan.estimate:
        lines.append("ESTIMATE: no compiler for GPUs here; memory from abstract evaluation, FLOPs from the "
                     "architecture")
    lines += ["", f"  {'remat':<8}{'seq len':>9}{'HBM/chip':>12}{'host/chip':>12}  {'fits':<5}how known"]
    for x in plan.attempts:
        lines.append(f"  {x.remat:<8}{x.seq_len or r.seq_len:>9,}{gib(x.bytes_per_chip):>12}"
                     f"{gib(x.host_bytes_per_chip):>12}  {'yes' if x.fits else 'no':<5}{_source(x)}"
                     + (f": {x.note}" if x.note and x.source != "refused by the compiler" else ""))
    m = a.memory
    how = {"compiled": "compiler", "refused by the compiler": "compiler, refused"}.get(a.source, "estimate")
    lines += ["", f"memory per chip (remat {a.remat}, {how}):"]
    args = (f"  arguments    {gib(m['arguments']):>11}  (frozen {gib(m['frozen'])}, adapters {gib(m['params'])}, "
            f"AdamW state {gib(m['opt_state'])})")
    if a.source == "compiled":
        lines += [args,
                  f"  outputs      {gib(m['outputs']):>11}  ({gib(m['donated'])} of them in donated argument buffers)",
                  f"  temporaries  {gib(m['temporaries']):>11}",
                  f"  code         {gib(m['code']):>11}"]
    elif "temporaries" in m:
        lines += [args, f"  temporaries  {gib(m['temporaries']):>11}  (as XLA rounded it when refusing)"]
    else:
        lines.append(args)
        if "activations and gradients" in m:
            lines.append(f"  activations  {gib(m['activations and gradients']):>11}  (saved for backward, + gradients)")
    if a.host_bytes_per_chip:
        lines.append(f"  host memory  {gib(a.host_bytes_per_chip):>11}  (pinned host memory, offloaded layer inputs; "
                     f"not HBM)" + ("" if a.source == "compiled" else " (estimate)"))
    free = hbm - a.bytes_per_chip
    lines.append(f"  total        {gib(a.bytes_per_chip):>11}  of {gib(hbm)}: "
                 + (f"FITS ({gib(free)} free)" if a.fits else f"DOES NOT FIT (over by {gib(-free)})"
                    if free < 0 else "DOES NOT FIT"))
    lines += _load_lines(plan)
    if a.source in ("compiled", "refused by the compiler"):
        lines.append(f"compile time of the step: {seconds(a.compile_seconds)} (trace and lower "
                     f"{seconds(a.lower_seconds)}, libtpu {seconds(a.compile_seconds - a.lower_seconds)}; effort "
                     f"{r.effort}, decoder layers {'scanned' if plan.scan_layers else 'as a loop'})")
    rf = plan.roofline
    if a.fits or a.flops_per_chip:
        how = "compiler cost analysis" if a.flops_per_chip else "counted from the architecture (estimate)"
        flops = rf.compute_seconds * rf.peak_flops
        traffic = rf.memory_seconds * t.chip.hbm_bandwidth
        lines += ["", f"per step and chip ({how}): {flop(flops)}, {traffic / 1e9:,.2f} GB of HBM traffic",
                  f"roofline: {step_time(rf.step_seconds)}/step ({rf.bound}-bound; compute {step_time(rf.compute_seconds)}, "
                  f"HBM {step_time(rf.memory_seconds)}) -> {plan.tokens_per_step / rf.step_seconds:,.0f} tokens/s, "
                  f"MFU {100 * rf.mfu:.1f}% (model FLOPs {rf.model_flops:.3g}/step; no communication counted)"]
    if plan.suggestion is not None:
        s = plan.suggestion
        lines += ["", f"suggestion ({s.reason}): --topology {s.topology} {s.flags()}  "
                      f"-> {gib(s.bytes_per_chip)} per chip"]
    elif not a.fits and r.suggest:
        lines += ["", "no suggestion: no setting of this slice that fits was found, and no larger standard "
                      "slice is estimated to fit"]
    if not a.fits and not plan.quantize:
        lines.append("(--quantize nf4 stores the frozen projections in ~4.1 bits per weight instead of 16)")
    lines += [f"note: {n}" for n in plan.notes]
    search = plan.max_seq_len
    if search is not None:
        lines += ["", f"largest --seq-len that fits (multiples of {search.multiple:,}, remat {search.remat}): "
                      + (f"{search.answer:,} (compiled)" if search.source == "compiled" else
                         f"{search.answer:,} (estimate; not confirmed by a compile)")
                      + (f"; {search.too_long:,} does not fit" if search.too_long else "")
                      + f"; the estimate said {search.estimate:,}"]
    if a.fits and (r.remat == "auto" or search is not None):
        lines.append(f"train with: jlora train --mesh {mesh_text(a.mesh)} --batch-size {a.batch_size} "
                     f"--seq-len {a.seq_len or r.seq_len}" + (f" --remat {a.remat}" if a.remat != "none" else ""))
    return "\n".join(lines)


def _load_lines(plan: Plan) -> list[str]:
    """The checkpoint's sharded load onto the chosen mesh (jlora.plan.load), per chip and per host."""
    load = plan.load
    if load is None:
        return []
    dpc, hbm = plan.devices_per_chip, plan.hbm_bytes_per_chip
    lines = [f"load (load_hf onto mesh {mesh_text(plan.chosen.mesh)}, each device only its shards): "
             f"{gib(load.device_bytes * dpc)} per chip once loaded, peak {gib(load.device_peak_bytes * dpc)} "
             f"with {load.peak_tensor} in flight: " + ("fits" if plan.load_fits else f"DOES NOT FIT {gib(hbm)}"),
             f"  each host's {load.devices_per_host} devices receive {gib(load.host_share_bytes)}; host memory in "
             f"flight ~{gib(load.host_inflight_bytes)} (one shard at a time; the largest: {load.inflight_tensor}); "
             f"devices in host memory (CPU): peak ~{gib(load.host_peak_bytes_cpu)}"]
    if load.replicated:
        lines.append(f"  {len(load.replicated)} NF4 projections do not split into whole blocks over fsdp x tensor: "
                     f"held whole on every device (e.g. {load.replicated[0]})")
    return lines


def to_json(plan: Plan) -> dict:
    r, t, a, rf = plan.request, plan.topology, plan.chosen, plan.roofline
    known = a.fits or a.flops_per_chip
    return {
        "fits": bool(plan.fits),
        "bytes_per_chip": int(a.bytes_per_chip),
        "hbm_bytes_per_chip": int(plan.hbm_bytes_per_chip),
        "estimate": plan.estimate or not a.exact,
        "model": r.model, "quantize": plan.quantize, "dtype": r.dtype, "r": r.r, "targets": r.targets,
        "topology": t.name, "chip": t.chip.name, "chips": t.chips, "devices": plan.devices,
        "host_bytes_per_chip": int(a.host_bytes_per_chip),
        "attention": plan.attention, "loss_chunk_tokens": r.loss_chunk_tokens,
        "mesh": a.mesh, "remat": a.remat, "batch_size": a.batch_size, "seq_len": a.seq_len or r.seq_len,
        "grad_accum": a.grad_accum, "kernels": r.kernels,
        "trainable_params": plan.trainable_params, "total_params": plan.total_params,
        "memory": {k: int(v) for k, v in a.memory.items()},
        "flops_per_chip": rf.compute_seconds * rf.peak_flops if known else None,
        "hbm_bytes_accessed_per_chip": rf.memory_seconds * t.chip.hbm_bandwidth if known else None,
        "model_flops_per_step": rf.model_flops,
        "step_seconds": rf.step_seconds if known else None,
        "tokens_per_second": plan.tokens_per_step / rf.step_seconds if known else None,
        "mfu": rf.mfu if known else None,
        "bound": rf.bound if known else None,
        "compile_seconds": a.compile_seconds if a.source != "estimate" and a.source != "arguments alone" else None,
        "scan_layers": plan.scan_layers,
        "load": None if plan.load is None else {**dataclasses.asdict(plan.load), "fits": plan.load_fits,
                                                "host_peak_bytes_cpu": plan.load.host_peak_bytes_cpu},
        "attempts": [dataclasses.asdict(x) for x in plan.attempts],
        "suggestion": None if plan.suggestion is None else {**dataclasses.asdict(plan.suggestion),
                                                             "flags": plan.suggestion.flags()},
        "notes": plan.notes,
        "max_seq_len": None if plan.max_seq_len is None else {
            "answer": plan.max_seq_len.answer, "source": plan.max_seq_len.source, "remat": plan.max_seq_len.remat,
            "estimate": plan.max_seq_len.estimate, "fits": plan.max_seq_len.fits,
            "too_long": plan.max_seq_len.too_long, "multiple": plan.max_seq_len.multiple},
    }
