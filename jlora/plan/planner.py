"""`plan(PlanRequest(...)) -> Plan`: does a LoRA/QLoRA training step fit a TPU slice, with which settings, how fast.

For a TPU topology the real train step (jlora.train.step, the trainer's shardings and optimizer) is
lowered with abstract arguments and compiled by libtpu for that generation; memory and cost come from
the compiler. For GPUs (h100, h200) there is no compiler here: memory is estimated by abstract
evaluation (jlora.plan.estimate) and FLOPs counted from the architecture, and the plan says so.

remat "auto" tries the policies lightest first (none, full, offload: jlora.remat.AUTO_ORDER) and keeps the
first that fits; policies whose estimate is over HBM are passed over without a compile. Host memory (the layer
inputs "offload" keeps in pinned host memory) is reported apart from HBM and never counts against it. A
setting whose arguments alone exceed HBM, or whose estimate is over twice HBM, is reported without
compiling it (a refused compile still costs minutes).

The attention backend (`attention`, as jlora train --attention) is resolved for the target: "auto" is
splash on TPU (the step is traced here and compiled with Mosaic kernels, under jax.set_mesh so each device
runs its own rows and heads); for GPUs the estimate traces blockwise attention, which saves what cuDNN's
flash attention saves (the output and its log-sum-exp). The loss is chunked as jlora train chunks it
(`loss_chunk_tokens`, None: whole logits).

The step is compiled with the decoder layers scanned (`scan_layers`, as jlora train runs them), so its compile
time does not grow with depth; the estimate traces the loop model (the same residuals, layer by layer). Under
scan the roofline counts FLOPs and HBM bytes from the architecture: XLA's cost analysis counts a loop body once.
The checkpoint's sharded load onto the mesh is planned too (jlora.plan.load): a mesh the loader would refuse is
refused with its error, and `fits` needs the load to fit as well as the step.

`max_seq_len()` (jlora plan --max-seq-len) finds the largest sequence length that fits: a bisection over
the estimate (cheap), then compiles from the estimate's answer, bisecting between what fitted and what
did not until they are one `seq_len_multiple` apart or `max_compiles` are spent.
"""
from __future__ import annotations

import dataclasses

import contextlib

import jax

from jlora.attention import check_backend, use_attention
from jlora.models.stacked import is_stacked, stack_layers
from jlora.plan.arguments import ArraySizes, abstract_step
from jlora.plan.compile_step import EFFORTS, compile_step
from jlora.plan.estimate import ActivationModel, estimate_bytes_per_device
from jlora.convert.mesh_rules import MeshError
from jlora.plan.flops import flops_per_token, forward_flops_per_token
from jlora.plan.hardware import Topology, parse_topology, tpu_devices
from jlora.plan.load import LoadPlan, plan_load
from jlora.plan.model import (PlanError, abstract_lora_model, checkpoint_quantization, lora_config,
                              model_config)
from jlora.plan.roofline import Roofline, roofline
from jlora.remat import AUTO_ORDER, POLICIES
from jlora.train.chunked_loss import DEFAULT_CHUNK_TOKENS
from jlora.train.sharding import AXES, parse_mesh

REMAT = {"auto": AUTO_ORDER, **{p: (p,) for p in POLICIES}}
SKIP_FACTOR = 2.0  # estimate over this many HBMs: not worth a compile
# Loop model only: scanned, the offloaded layer inputs are one stacked residual, which both efforts put in host
# memory whole (measured: 4 layers, 2.0 MiB host per chip at fast and at default effort).
OFFLOAD_FAST_NOTE = ("remat offload under --compile-effort fast: libtpu's quick schedule moved only one layer input "
                     "to host memory (measured; the default effort moves every layer's), so host bytes read low and "
                     "HBM high; --compile-effort default shows the offload as jlora train compiles it")


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    model: str
    topology: str
    batch_size: int
    seq_len: int
    mesh: str | None = None
    quantize: str | None = None
    r: int = 16
    lora_alpha: float | None = None
    targets: str = "all-linear"
    dtype: str = "bfloat16"
    remat: str = "auto"
    grad_accum: int = 1
    effort: str = "fast"
    suggest: bool = True
    max_compiles: int = 2     # extra compiles the suggestion may spend verifying itself
    kernels: str | None = None  # jlora.use_kernels impl for the adapted projections (None: the model's default path)
    attention: str = "auto"     # jlora train --attention; auto: splash on TPU
    loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS  # None: the whole logits at once
    seq_len_multiple: int = 1024  # --max-seq-len: answers are multiples of this
    max_seq_len: bool = False   # search the largest seq_len that fits (jlora.plan.seq_len); seq_len seeds it
    scan_layers: bool = True    # compile the decoder layers as one scanned layer (jlora.models.stacked)


@dataclasses.dataclass
class Attempt:
    """One (remat, mesh, batch) setting and what is known of its memory per chip."""
    remat: str
    mesh: dict
    batch_size: int
    grad_accum: int
    fits: bool
    bytes_per_chip: int
    source: str                   # compiled | refused by the compiler | arguments alone | estimate
    exact: bool                   # bytes from the compiler's memory analysis
    memory: dict = dataclasses.field(default_factory=dict)     # per chip, by part
    flops_per_chip: float | None = None
    bytes_accessed_per_chip: float | None = None
    compile_seconds: float = 0.0
    kernel_calls: int | None = None   # Mosaic (Pallas) custom calls in the program, with --kernels
    estimate_bytes_per_chip: int = 0
    note: str = ""
    host_bytes_per_chip: int = 0      # pinned host memory (remat offload), apart from HBM
    seq_len: int = 0
    lower_seconds: float = 0.0        # of compile_seconds, tracing and lowering (the rest: XLA/libtpu)


@dataclasses.dataclass
class Plan:
    request: PlanRequest
    topology: Topology
    quantize: str | None
    devices: int
    devices_per_chip: int
    total_params: int
    trainable_params: int
    attempts: list
    chosen: Attempt
    roofline: Roofline
    tokens_per_step: int
    estimate: bool                # no compiler: GPU
    suggestion: object = None     # jlora.plan.suggest.Suggestion
    notes: list = dataclasses.field(default_factory=list)
    attention: str = "auto"       # the backend the step was planned with
    max_seq_len: object = None    # SeqLenSearch, with --max-seq-len
    load: object = None           # jlora.plan.load.LoadPlan: the sharded load onto the chosen mesh (per device)
    scan_layers: bool = True      # the step was compiled with the decoder layers scanned

    @property
    def load_fits(self) -> bool:
        return self.load is None or self.load.fits(self.topology.chip.hbm_bytes // self.devices_per_chip)

    @property
    def fits(self) -> bool:
        """The step fits HBM and so does the checkpoint's load onto the mesh."""
        return self.chosen.fits and self.load_fits

    @property
    def bytes_per_chip(self) -> int:
        return self.chosen.bytes_per_chip

    @property
    def hbm_bytes_per_chip(self) -> int:
        return self.topology.chip.hbm_bytes


def default_mesh(devices: int, batch_size: int) -> dict:
    """All devices on fsdp when the batch rows split that far; what is left over goes to tensor."""
    fsdp = max(f for f in range(1, devices + 1) if devices % f == 0 and batch_size % f == 0)
    return {"data": 1, "fsdp": fsdp, "tensor": devices // fsdp}


def mesh_text(sizes: dict) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in AXES)


class Planner:
    """Holds what every attempt shares: the abstract model, its array sizes, the activation model, devices."""

    def __init__(self, request: PlanRequest, *, log=lambda *_: None):
        if request.remat not in REMAT:
            raise PlanError(f"--remat {request.remat!r}: expected one of {', '.join(REMAT)}")
        if request.effort not in EFFORTS:
            raise PlanError(f"--compile-effort {request.effort!r}: expected one of {', '.join(EFFORTS)}")
        if request.batch_size < 1 or request.seq_len < 1 or request.grad_accum < 1:
            raise PlanError("--batch-size, --seq-len and --grad-accum must be positive")
        if request.loss_chunk_tokens is not None and request.loss_chunk_tokens < 1:
            raise PlanError(f"--loss-chunk-tokens {request.loss_chunk_tokens}: expected >= 1 (or none: whole logits)")
        self.request, self.log = request, log
        self.topology = parse_topology(request.topology)
        self.attention, self.traced_attention = self.resolve_attention(request.attention)
        self.config = model_config(request.model)
        self.quantize = request.quantize or checkpoint_quantization(request.model)
        self.lora = lora_config(request.r, request.lora_alpha, request.targets)
        self.model = self.build(self.config, scan=request.scan_layers)
        self.sizes = ArraySizes.of(self.model)
        self._activations = {}
        self._loads = {}
        self.activations = self.activations_at(request.seq_len)
        if self.topology.is_tpu:
            self.devices = tpu_devices(self.topology)
            chips = len({tuple(d.coords) for d in self.devices})
            self.devices_per_chip = len(self.devices) // chips
            self.hosts = len({d.process_index for d in self.devices})
        else:
            self.devices = None
            self.devices_per_chip = 1
            self.hosts = 1
        self.n_devices = self.topology.chips * self.devices_per_chip

    def resolve_attention(self, name: str) -> tuple[str, str]:
        """(backend the plan is for, backend the estimate traces) on this topology's platform."""
        on = "tpu" if self.topology.is_tpu else "gpu"
        try:
            check_backend(name, on)
        except ValueError as e:
            raise PlanError(f"--attention {name}: {e} ({self.topology.name})") from None
        if name == "auto":
            name = "splash" if on == "tpu" else "cudnn"
        # cuDNN cannot be traced on this host; blockwise saves the same (output and log-sum-exp).
        return name, "blockwise" if name == "cudnn" else name

    def build(self, config, *, scan: bool = False):
        """The abstract LoRA model; scan: its layers stacked and scanned, as the compiled step runs them (the
        estimate traces the loop model, whose residuals it reads layer by layer: the same arrays)."""
        model = abstract_lora_model(config, lora=self.lora, dtype=self.request.dtype, quantize=self.quantize)
        if scan:
            model = stack_layers(model)
        return use_attention(model, self.traced_attention)

    def activations_at(self, seq_len: int) -> ActivationModel:
        if seq_len not in self._activations:
            self._activations[seq_len] = ActivationModel.measure(
                self.build, self.config, seq_len=seq_len, attention=self.traced_attention,
                chunk_tokens=self.request.loss_chunk_tokens)
        return self._activations[seq_len]

    # -- one setting ---------------------------------------------------------------------------------
    def estimate(self, sizes: dict, batch_size: int, remat: str, seq_len: int | None = None) -> int:
        """Estimated device bytes per chip (abstract evaluation) of a setting."""
        args = self.sizes.per_device(sizes)
        rows = batch_size / (sizes["data"] * sizes["fsdp"])
        per_device = estimate_bytes_per_device(sum(args.values()), args["params"],
                                               self.activations_at(seq_len or self.request.seq_len),
                                               rows_per_device=rows, remat=remat,
                                               tensor=sizes["tensor"], fsdp=sizes["fsdp"])
        return per_device * self.devices_per_chip

    def estimate_host(self, sizes: dict, batch_size: int, remat: str, seq_len: int | None = None) -> int:
        rows = batch_size / (sizes["data"] * sizes["fsdp"])
        acts = self.activations_at(seq_len or self.request.seq_len)
        return int(acts.host_bytes(rows=rows, remat=remat)) * self.devices_per_chip

    def attempt(self, sizes: dict, batch_size: int, remat: str, grad_accum: int | None = None, *,
                seq_len: int | None = None, compile_over_estimate: bool = True) -> Attempt:
        """What is known of one setting: compiled on TPU unless its arguments or estimate rule it out (with
        compile_over_estimate=False, any estimate over HBM)."""
        grad_accum = grad_accum or self.request.grad_accum
        seq_len = seq_len or self.request.seq_len
        hbm, dpc = self.topology.chip.hbm_bytes, self.devices_per_chip
        args = {k: v * dpc for k, v in self.sizes.per_device(sizes).items()}
        estimate = self.estimate(sizes, batch_size, remat, seq_len)
        base = dict(remat=remat, mesh=dict(sizes), batch_size=batch_size, grad_accum=grad_accum,
                    estimate_bytes_per_chip=estimate, seq_len=seq_len,
                    host_bytes_per_chip=self.estimate_host(sizes, batch_size, remat, seq_len))
        if sum(args.values()) > hbm:
            return Attempt(fits=False, bytes_per_chip=sum(args.values()), source="arguments alone", exact=False,
                           memory={"arguments": sum(args.values()), **args}, **base,
                           note="frozen weights, adapters and optimizer state alone exceed HBM; not compiled")
        if not self.topology.is_tpu:
            return Attempt(fits=estimate <= hbm, bytes_per_chip=estimate, source="estimate", exact=False,
                           memory={"arguments": sum(args.values()), **args,
                                   "activations and gradients": estimate - sum(args.values())}, **base)
        skip = SKIP_FACTOR if compile_over_estimate else 1.0
        if estimate > skip * hbm:
            return Attempt(fits=False, bytes_per_chip=estimate, source="estimate", exact=False,
                           memory={"arguments": sum(args.values()), **args,
                                   "activations and gradients": estimate - sum(args.values())}, **base,
                           note=f"estimated over {'' if skip == 1 else f'{skip:g}x '}HBM; not compiled")
        return self.compile(sizes, batch_size, remat, grad_accum, base)

    def compile(self, sizes, batch_size, remat, grad_accum, base) -> Attempt:
        from jlora.train.sharding import make_mesh

        mesh = make_mesh(mesh_text(sizes), devices=self.devices)
        if self.request.kernels:
            from jlora.llama import use_kernels
            use_kernels(self.model, self.request.kernels, mesh=mesh)
        self.model.remat = remat
        use_attention(self.model, self.attention)
        seq_len = base["seq_len"]
        step = abstract_step(self.model, mesh, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum,
                             loss_chunk_tokens=self.request.loss_chunk_tokens)
        self.log(f"compiling for {self.topology.name}: mesh {mesh_text(sizes)}, batch {batch_size} x {seq_len}, "
                 f"remat {remat}, attention {self.attention} ...")
        # Splash runs per device under shard_map only when the mesh is set while tracing (jlora.attention.splash).
        context = jax.set_mesh(mesh) if self.attention == "splash" else contextlib.nullcontext()
        with context:
            result = compile_step(step, effort=self.request.effort,
                                  count_kernels=bool(self.request.kernels) or self.attention == "splash")
        dpc = self.devices_per_chip
        if result.compiled:  # the compiler's host bytes replace the estimate's
            base = {**base, "host_bytes_per_chip": result.host_total_bytes * dpc}
        groups = {k: v * dpc for k, v in step.bytes_per_device().items()}
        memory = {"arguments": result.argument_bytes * dpc, "frozen": groups["frozen"], "params": groups["params"],
                  "opt_state": groups["opt_state"], "batch": groups["batch"] + groups["key"] + groups["step"],
                  "outputs": result.output_bytes * dpc, "donated": result.alias_bytes * dpc,
                  "temporaries": result.temp_bytes * dpc, "code": result.code_bytes * dpc,
                  "host_temporaries": result.host_temp_bytes * dpc}
        total = result.total_bytes * dpc
        seconds = result.lower_seconds + result.compile_seconds
        if not result.compiled:
            return Attempt(fits=False, bytes_per_chip=total, source="refused by the compiler", exact=False,
                           memory=memory, compile_seconds=seconds, **base,
                           note=f"XLA: {result.error}; temporaries are as XLA rounds them")
        # cost_analysis counts the micro-batch loop's body once, not once per trip; so too the scanned
        # layers' body: under scan FLOPs and traffic are counted from the architecture (roofline_of).
        scale = dpc * grad_accum
        counted = not is_stacked(self.model)
        return Attempt(fits=total <= self.topology.chip.hbm_bytes, bytes_per_chip=total, source="compiled",
                       exact=True, memory=memory, compile_seconds=seconds, kernel_calls=result.kernel_calls,
                       flops_per_chip=(result.flops or 0.0) * scale if counted else None,
                       bytes_accessed_per_chip=(result.bytes_accessed or 0.0) * scale if counted else None,
                       lower_seconds=result.lower_seconds, **base)

    # -- the whole plan ------------------------------------------------------------------------------
    def mesh_sizes(self) -> dict:
        r = self.request
        if r.mesh:
            try:
                sizes = parse_mesh(r.mesh, self.n_devices)
            except ValueError as e:
                raise PlanError(f"{e} ({self.topology.name} has {self.n_devices} devices)") from None
        else:
            sizes = default_mesh(self.n_devices, r.batch_size)
        rows = sizes["data"] * sizes["fsdp"]
        if r.batch_size % rows:
            raise PlanError(f"--batch-size {r.batch_size} must be a multiple of data x fsdp = {rows} "
                            f"(mesh {mesh_text(sizes)})")
        try:
            self.load_at(sizes)  # the loader refuses a mesh axis that does not divide a tensor: so does the plan
        except MeshError as e:
            raise PlanError(str(e) if r.mesh else f"{e} (the default mesh {mesh_text(sizes)}; pass --mesh)") from None
        return sizes

    def load_at(self, sizes: dict) -> LoadPlan:
        """The sharded streaming load of the checkpoint onto a mesh of these sizes (jlora.plan.load); raises
        the loader's MeshError where it would refuse the mesh."""
        key = tuple(sizes[a] for a in AXES)
        if key not in self._loads:
            self._loads[key] = plan_load(self.config, sizes, dtype=self.request.dtype, quantize=self.quantize,
                                         devices_per_host=self.n_devices // self.hosts,
                                         scan_layers=self.request.scan_layers)
        return self._loads[key]

    def loadable(self, sizes: dict) -> bool:
        try:
            self.load_at(sizes)
        except MeshError:
            return False
        return True

    def roofline_of(self, attempt: Attempt) -> Roofline:
        seq_len = attempt.seq_len or self.request.seq_len
        tokens = attempt.batch_size * attempt.grad_accum * seq_len
        per_token = flops_per_token(self.config, self.lora, seq_len)
        model_flops = tokens * per_token
        chips = self.topology.chips
        if attempt.flops_per_chip:
            return roofline(flops_per_chip=attempt.flops_per_chip, bytes_per_chip=attempt.bytes_accessed_per_chip,
                            chip=self.topology.chip, chips=chips, model_flops=model_flops)
        # No compiler numbers: model FLOPs (+ the recomputed forward under remat) and a traffic estimate:
        # each pass reads this chip's share of the gathered weights; activations are written and read back.
        recompute = attempt.remat in ("full", "offload")  # dots recomputes no projection
        passes = 3 if recompute else 2
        forward = forward_flops_per_token(self.config, self.lora, seq_len) if recompute else 0.0
        flops = tokens * (per_token + forward) / chips
        weights = self.sizes.total()["frozen"] / attempt.mesh["tensor"]
        rows = attempt.batch_size * attempt.grad_accum / (attempt.mesh["data"] * attempt.mesh["fsdp"])
        acts = 2 * self.activations_at(seq_len).bytes(rows=rows, remat=attempt.remat, tensor=attempt.mesh["tensor"],
                                                      fsdp=attempt.mesh["fsdp"])
        traffic = (passes * weights * attempt.grad_accum + acts) * self.devices_per_chip
        return roofline(flops_per_chip=flops, bytes_per_chip=traffic, chip=self.topology.chip, chips=chips,
                        model_flops=model_flops)

    def run(self) -> Plan:
        r = self.request
        sizes = self.mesh_sizes()
        if r.max_seq_len:
            return self.run_max_seq_len(sizes)
        attempts = []
        policies = REMAT[r.remat]
        for i, remat in enumerate(policies):
            # auto passes over a policy estimated over HBM (a compile costs minutes), except the last one
            attempts.append(self.attempt(sizes, r.batch_size, remat, compile_over_estimate=i == len(policies) - 1))
            if attempts[-1].fits or attempts[-1].source == "arguments alone":
                break
        chosen = next((a for a in attempts if a.fits), attempts[-1])
        trainable, total = self.sizes.counts()
        plan = Plan(request=r, topology=self.topology, quantize=self.quantize, devices=self.n_devices,
                    devices_per_chip=self.devices_per_chip, total_params=total, trainable_params=trainable,
                    attempts=attempts, chosen=chosen, roofline=self.roofline_of(chosen),
                    tokens_per_step=r.batch_size * r.grad_accum * r.seq_len, estimate=not self.topology.is_tpu,
                    attention=self.attention, load=self.load_at(chosen.mesh), scan_layers=r.scan_layers)
        if self.devices_per_chip > 1:
            plan.notes.append(f"libtpu describes {self.topology.chip.name} as {self.devices_per_chip} devices per "
                              f"chip (one per TensorCore): the mesh spans {self.n_devices} devices; memory is per chip")
        per_host = self.n_devices // self.hosts
        if self.hosts > 1 and chosen.mesh["tensor"] > per_host:
            plan.notes.append(f"tensor={chosen.mesh['tensor']} spans hosts ({per_host} devices each): jlora train "
                              f"feeds each host its own rows, so keep tensor <= {per_host} on {self.hosts} hosts")
        if self.hosts > 1 and chosen.batch_size % self.hosts:
            plan.notes.append(f"jlora train on {self.hosts} hosts needs --batch-size to be a multiple of {self.hosts}")
        if self.request.attention == "cudnn" or (self.request.attention == "auto" and not self.topology.is_tpu):
            plan.notes.append("attention cudnn: estimated with blockwise attention, which saves the same "
                              "(output and log-sum-exp per query)")
        if chosen.remat == "offload" and chosen.source == "compiled" and r.effort == "fast" and not r.scan_layers:
            plan.notes.append(OFFLOAD_FAST_NOTE)
        if chosen.remat == "none" and chosen.mesh["fsdp"] > 1 and chosen.source == "compiled":
            plan.notes.append("without remat XLA keeps each layer's all-gathered weights from the forward to the "
                              "backward pass (it reuses the gather), so fsdp shrinks the arguments but not the "
                              "temporaries; with --remat the gather is redone layer by layer")
        if not plan.load_fits:
            plan.notes.append(f"the checkpoint's load does not fit: {plan.load.peak_tensor} in flight")
        if not chosen.fits and r.suggest:
            from jlora.plan.suggest import suggest
            plan.suggestion = suggest(self, attempts)
        return plan


    def run_max_seq_len(self, sizes: dict) -> Plan:
        from jlora.plan.seq_len import max_seq_len

        r = self.request
        search = max_seq_len(self)
        attempts = search.attempts or [self.attempt(sizes, r.batch_size, search.remat,
                                                    seq_len=max(search.estimate, r.seq_len_multiple),
                                                    compile_over_estimate=False)]
        chosen = next((a for a in attempts if a.fits and a.seq_len == search.answer), attempts[-1])
        trainable, total = self.sizes.counts()
        return Plan(request=r, topology=self.topology, quantize=self.quantize, devices=self.n_devices,
                    devices_per_chip=self.devices_per_chip, total_params=total, trainable_params=trainable,
                    attempts=attempts, chosen=chosen, roofline=self.roofline_of(chosen),
                    tokens_per_step=chosen.batch_size * chosen.grad_accum * chosen.seq_len,
                    estimate=not self.topology.is_tpu, attention=self.attention, max_seq_len=search,
                    load=self.load_at(chosen.mesh), scan_layers=r.scan_layers)


def plan(request: PlanRequest, *, log=lambda *_: None) -> Plan:
    """Plans `request`; see the module docstring."""
    return Planner(request, log=log).run()
