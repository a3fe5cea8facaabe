"""`Trainer`: the whole fine-tuning job, from a checkpoint dir and JSONL to a PEFT adapter, resumable.

    trainer = Trainer(TrainConfig(model="path/to/llama", data="train.jsonl", out="runs/x", steps=100))
    result = trainer.run()      # {"losses": [...], "adapter": "runs/x/adapter", ...}
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.atomic_files import write_json
from jlora.data import BatchIterator, Columns, DataError, read_records, split_holdout, tokenize_records
from jlora.data.iterator import Prefetch
from jlora.llama import use_kernels
from jlora.lora_config import TARGET_PRESETS, LoraConfig
from jlora.peft_model import get_peft_model, trainable_parameters
from jlora.train import hosts, long_context, reporters, run_dir, samples
from jlora.train import scan_layers
from jlora.train.checkpoints import Checkpoints
from jlora.train.config import TrainConfig, modules_to_save_setting, token_indices_setting
from jlora.train.guard import DeadGradient, Guard, NonFiniteLoss, TrainingStopped
from jlora.train.metrics import MetricsLog, plot_losses
from jlora.train.optimizer import learning_rate_schedule, make_optimizer
from jlora.train.placement import opt_state_shardings, put_batch, shard_state
from jlora.train.run_dir import RunDirError
from jlora.train.sharding import flat_shardings, make_mesh, shard_flat
from jlora.train.state import SplitModel, unflatten
from jlora.train.step import make_eval_step, make_train_step

__all__ = ["Trainer", "RunDirError", "TrainingStopped", "NonFiniteLoss", "DeadGradient"]


def _targets(spec: str):
    return spec if spec in TARGET_PRESETS else [t.strip() for t in spec.split(",") if t.strip()]


def trainable_embeddings(c: TrainConfig) -> dict:
    """LoraConfig's modules_to_save / trainable_token_indices from --modules-to-save / --trainable-token-indices."""
    return {"modules_to_save": modules_to_save_setting(c.modules_to_save) if c.modules_to_save else None,
            "trainable_token_indices": (token_indices_setting(c.trainable_token_indices)
                                        if c.trainable_token_indices else None)}


# Batches prepared and placed on the devices ahead of the step that takes them.
PREFETCH_DEPTH = 2


class Trainer:
    """sync_loop=True reads every step's metrics before the next batch is prepared (no prefetch, no
    lag): the loop as it was before it overlapped, kept to check that overlapping changes no number."""

    def __init__(self, config: TrainConfig, *, log=print, sync_loop: bool = False):
        self.config = config
        self.sync_loop = sync_loop
        self.out = Path(config.out)
        hosts.initialize()  # before anything below touches a JAX backend
        self.log = log if hosts.is_main() else (lambda *a, **k: None)

    # -- setup -------------------------------------------------------------------------------------
    def _model_dir(self) -> Path:
        if self.config.model:  # a local dir or a Hub id, checked before any tokenizer/weights load
            from jlora.convert.model_dir import open_model_dir
            return open_model_dir(self.config.model)
        from jlora.default.checkpoint import build_default_base
        return build_default_base(self.out / "base")

    def _data(self, tokenizer):
        c = self.config
        if c.data is None and c.model is None:
            from jlora.default import dataset_paths
            train_path, eval_path = dataset_paths()
        elif c.data is None:
            raise DataError("--data is required with --model (a JSONL file of text, prompt+completion or messages)")
        else:
            train_path, eval_path = Path(c.data), (Path(c.eval) if c.eval else None)
        columns = Columns(text=c.text_field, prompt=c.prompt_field, completion=c.completion_field,
                          messages=c.messages_field)
        records = read_records(train_path, columns)  # JSONL, parquet, CSV or a saved dataset
        if eval_path is None and c.eval_fraction > 0 and len(records) >= 20:
            records, eval_records = split_holdout(records, fraction=c.eval_fraction, seed=c.seed)
        else:
            eval_records = read_records(eval_path, columns) if eval_path else []
        train, stats = tokenize_records(records, tokenizer, seq_len=c.seq_len)
        evals = tokenize_records(eval_records, tokenizer, seq_len=c.seq_len)[0] if eval_records else []
        self.sample_source = (eval_records or records)[:32]  # default --sample-prompts: the first eval prompts
        return train, evals, stats

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        from jlora.convert.hf_checkpoint import load_hf
        from jlora.convert.model_dir import load_tokenizer
        from jlora.convert.merged import save_merged
        from jlora.convert.peft_adapter import save_pretrained

        c = self.config
        self.log(f"settings: {c.summary()}")
        # Everything is checked before the run directory is touched: --out, --resume's settings, the mesh,
        # the data, the model (a typo must not cost the run that --overwrite would replace).
        run_dir.check(c, log=self.log)
        sample_prompts = samples.from_config(c)  # --sample-prompts: a bad file fails now
        long_context.check_platform(c)  # --attention runs here
        scan, scan_note = scan_layers.decide(c)  # --scan-layers (auto: scan unless a setting needs the loop)
        if scan_note:
            self.log(scan_note)
        reporters.check_installed(c.report_to)  # --report-to wandb without wandb: say which extra, now
        mesh = make_mesh(c.mesh)
        row_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if c.batch_size % row_shards:
            raise ValueError(f"--batch-size {c.batch_size} must be a multiple of data x fsdp = {row_shards} "
                             f"(mesh {dict(mesh.shape)})")
        if hosts.is_main():
            self._model_dir()  # builds the default base when no --model is given
        hosts.barrier("jlora: base model ready")
        model_dir = self._model_dir()
        tokenizer = load_tokenizer(model_dir)
        train_examples, eval_examples, stats = self._data(tokenizer)
        self.log(f"data: {stats}" + (f"; {stats.truncated:,} examples cut to --seq-len {c.seq_len}"
                                     if stats.truncated else ""))

        model = load_hf(model_dir, dtype=c.dtype, quantize=c.quantize, mesh=mesh,  # each array born sharded
                        scan_layers=scan)  # born stacked when scanned
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"{model_dir}: the tokenizer has {len(tokenizer):,} tokens but the model's vocab_size "
                             f"is {model.config.vocab_size:,}: ids past the embedding would be read silently")
        lora_config = LoraConfig(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                                 use_rslora=c.use_rslora, use_dora=c.use_dora, target_modules=_targets(c.targets),
                                 **trainable_embeddings(c))
        model = get_peft_model(model, lora_config, rngs=nnx.Rngs(params=c.seed, dropout=c.seed + 1))
        model = scan_layers.settle(model, log=self.log)  # adapters that do not repeat: the loop
        long_context.configure_model(model, c, log=self.log)  # --attention, --remat, the --seq-len warning
        trainable, total = trainable_parameters(model)
        self.log(f"model: {model_dir} ({c.dtype}); LoRA r={c.r} alpha={c.lora_alpha} on {c.targets}: "
                 f"trainable params: {trainable:,d} || all params: {total:,d} || "
                 f"trainable%: {100 * trainable / total:.4f}")

        rows_per_step = c.batch_size * c.grad_accum
        it = BatchIterator(train_examples, seq_len=c.seq_len, batch_size=rows_per_step, packing=c.packing,
                           seed=c.seed, pad_id=tokenizer.pad_token_id or 0,
                           process_index=jax.process_index(), process_count=jax.process_count())
        steps = c.steps or max(1, math.ceil(c.epochs * it.steps_per_epoch))

        if c.kernels:
            use_kernels(model, c.kernels, mesh=mesh)
        model.train()
        split = SplitModel.of(model)
        model.eval()
        eval_split = SplitModel.of(model)
        schedule = learning_rate_schedule(c.lr, steps, c.warmup_steps, c.lr_schedule)
        tx = make_optimizer(schedule, weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
                            loraplus_lr_ratio=c.loraplus_lr_ratio)
        params = shard_flat(split.params(), mesh)
        frozen = shard_state(split.frozen, mesh)
        opt_state = tx.init(params)
        opt_shard = opt_state_shardings(opt_state, mesh)
        opt_state = jax.device_put(opt_state, opt_shard)
        param_shard = flat_shardings(params, mesh)
        chunk = c.loss_chunk_tokens or None  # 0: the whole logits at once
        train_step = jax.jit(make_train_step(split, tx, schedule=schedule, loss_chunk_tokens=chunk),
                             donate_argnums=(0, 1),
                             out_shardings=(param_shard, opt_shard, None))
        eval_step = jax.jit(make_eval_step(eval_split, loss_chunk_tokens=chunk))
        key = jax.random.key(c.seed)

        # The checks passed: from here on the run directory is written.
        if hosts.is_main():
            if c.overwrite:
                run_dir.set_aside(self.out, log=self.log)
            self.out.mkdir(parents=True, exist_ok=True)
        hosts.barrier("jlora: run directory ready")
        ckpt = Checkpoints(self.out / "checkpoints", keep=c.keep_checkpoints)
        start = 0
        if c.resume and ckpt.latest_step() is not None:
            start = ckpt.latest_step()
            restored, meta = ckpt.restore(start, {"params": params, "opt_state": opt_state})
            params, opt_state = restored["params"], restored["opt_state"]
            it.restore(meta["data"])
            self.log(f"resumed from {ckpt.directory / str(start)} at step {start}")
        elif c.resume:
            self.log(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0")
        metrics_log = (MetricsLog(self.out / "metrics.jsonl", resume_from_step=start if c.resume else None,
                                  report_to=c.report_to, run_config=c.to_dict())
                       if hosts.is_main() else None)  # process 0 logs (and reports: --report-to)
        if hosts.is_main():
            write_json(self.out / "run_config.json", c.to_dict())
        demo = c.model is None and c.data is None  # the demo shows one prompt
        sampler = samples.for_run(c, self.out, sample_prompts or samples.from_records(
            self.sample_source, 1 if demo else samples.DEFAULT_COUNT), last_step=steps, start=start)

        def sample(n):  # samples.jsonl at step n (0: before the first step) from the current params
            if sampler is not None and sampler.due(n):
                sampler.take(n, eval_split.model(params, frozen), tokenizer)

        def save(step, data_state):
            ckpt.save(step, {"params": params, "opt_state": opt_state},
                      {"step": step, "data": data_state, "seed": c.seed, "config": c.to_dict()})
            if c.overwrite and hosts.is_main():
                run_dir.drop_previous(self.out)  # the new run has a checkpoint: the replaced run goes

        def eval_batches():
            return BatchIterator(eval_examples, seq_len=c.seq_len, batch_size=c.batch_size, shuffle=False,
                                 epochs=1, pad_id=tokenizer.pad_token_id or 0,
                                 process_index=jax.process_index(), process_count=jax.process_count())

        def evaluate():
            if not eval_examples:
                return None
            total_loss, count = 0.0, 0.0
            for b in eval_batches():
                s, n = eval_step(params, frozen, put_batch(b, mesh, 0))
                total_loss, count = total_loss + float(s), count + float(n)
            return total_loss / max(count, 1.0)

        def prepare(batch):
            batch = {k: v.reshape(c.grad_accum, -1, v.shape[-1]) for k, v in batch.items()}
            tokens = int((batch["segment_ids"] > 0).sum()) * jax.process_count()
            return put_batch(batch, mesh, 1), tokens

        last_data_state = it.state()
        losses, eval_loss = [], None
        last_saved = start if start else None
        guard = Guard()
        done_at = 0.0  # when the previous step's metrics arrived
        if start < steps:  # compilation is its own phase: the bar's rate and ETA count steps only
            (batch, tokens), data_state = prepare(next(it)), it.state()
            evals = bool(c.eval_every and eval_examples)
            self.log(f"compiling the training step{' and the eval step' if evals else ''} ...")
            t0 = time.perf_counter()
            with long_context.tracing_context(c, mesh):  # splash on a mesh: per device
                train_step = train_step.lower(params, opt_state, frozen, batch, key,
                                              jnp.asarray(start, jnp.int32)).compile()
                if evals:  # fills jit's cache for the eval batches' shape
                    eval_step.lower(params, frozen, put_batch(next(iter(eval_batches())), mesh, 0)).compile()
            jax.block_until_ready((params, opt_state, frozen, batch))  # the steps' times count steps only
            self.log(f"compiled in {time.perf_counter() - t0:.1f} s")
            sample(start)

        # The next batches are prepared and put on the devices by a thread while steps run (Prefetch);
        # each comes with the data state to checkpoint once its step is done.
        batches = Prefetch(it, prepare, depth=0 if self.sync_loop else PREFETCH_DEPTH)
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, disable=not c.progress or not hosts.is_main(),
                   desc="train", unit="step", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 5.0)

        def boundary(n):
            """Steps whose updated params are used (eval, checkpoint, the end): their metrics are read
            and checked before the next step is dispatched, so a non-finite update is never saved."""
            return (n == steps or bool(c.save_every and n % c.save_every == 0)
                    or bool(c.eval_every and n % c.eval_every == 0) or (sampler is not None and sampler.due(n)))

        def finish(step, m, tokens, data_state, dispatched):
            """The host's side of step `step` (from 0), once its metrics are read: the guard, the metrics
            line, the bar; at a boundary also eval and the checkpoint (params are then this step's)."""
            nonlocal eval_loss, last_saved, last_data_state, done_at
            m = jax.device_get(m)  # waits for this step only; the next one may already be queued behind it
            now = time.perf_counter()
            dt = now - max(dispatched, done_at)  # this step's share of the wall time
            done_at = now
            loss, params_finite, where = float(m["loss"]), bool(m["params_finite"]), ""
            if not (math.isfinite(loss) and params_finite):
                removed = None
                if not math.isfinite(loss) and last_saved == step and step != start:
                    # That checkpoint's next step (this one) is not finite: no place to resume from.
                    ckpt.delete(step)
                    removed, last_saved = step, ckpt.latest_step()
                where = (f"the last good checkpoint (its next step's loss was finite) is step {last_saved} "
                         f"in {ckpt.directory}" if last_saved is not None else "no good checkpoint was saved")
                if removed is not None:
                    where += f"; the step-{removed} checkpoint, whose next step was not finite, was removed"
            guard.check(step + 1, loss, float(m["grad_norm"]), params_finite, last_good=where)
            losses.append(loss)
            last_data_state = data_state
            record = {"step": step + 1, "loss": loss, "lr": float(m["lr"]),
                      "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tokens / dt,
                      "target_tokens": int(m["target_tokens"])}
            if c.eval_every and ((step + 1) % c.eval_every == 0 or step + 1 == steps):
                ev = evaluate()
                if ev is not None:
                    eval_loss = ev
                    record.update(eval_loss=ev, eval_ppl=math.exp(min(ev, 50)))
            sample(step + 1)
            if (step + 1) % c.log_every == 0 or "eval_loss" in record or step + 1 == steps:
                if metrics_log is not None:
                    metrics_log.write(record)
            postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens / dt:,.0f}"}
            if eval_loss is not None:
                postfix["eval"] = f"{eval_loss:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if c.save_every and (step + 1) % c.save_every == 0:
                save(step + 1, data_state)
                last_saved = step + 1

        # Step k's metrics are read after step k + 1 is dispatched (one step late), so the host never
        # waits on a step the devices have not been given work beyond; boundary steps are read at once.
        pending = None
        try:
            for step in range(start, steps):
                if step > start:
                    (batch, tokens), data_state = next(batches)
                dispatched = time.perf_counter()
                params, opt_state, m = train_step(params, opt_state, frozen, batch, key,
                                                  jnp.asarray(step, jnp.int32))
                del batch  # its buffers go once the step is done with them
                if pending is not None:
                    finish(*pending)
                pending = (step, m, tokens, data_state, dispatched)
                if self.sync_loop or boundary(step + 1):
                    finish(*pending)
                    pending = None
        finally:
            batches.close()
            bar.close()
            if metrics_log is not None:
                metrics_log.close()  # flushes the --report-to reporters (also when the guard stopped the run)
        if last_saved != steps:
            save(steps, last_data_state)
        ckpt.close()

        nnx.update(model, unflatten(split.lora_template, hosts.to_host(params)))
        adapter_dir = self.out / "adapter"
        result = {"losses": losses, "adapter": str(adapter_dir), "steps": steps, "model_dir": str(model_dir)}
        if not hosts.is_main():  # process 0 writes the adapter, merged model and plot
            hosts.barrier("jlora: exports written")
            return result
        from jlora.convert.hub import base_model_name, base_model_revision  # the Hub id when --model was one
        save_pretrained(model, adapter_dir, base_model_name_or_path=base_model_name(c.model, model_dir),
                        revision=base_model_revision(c.model, model_dir))
        if c.merge:
            result["merged"] = str(save_merged(model, self.out / "merged"))
        records = metrics_log.records()
        result["plot"] = str(plot_losses(records, self.out / "loss.png", title=f"jlora: {self.out.name}"))
        result["records"] = records
        for line in sampler.summary() if sampler is not None else ():
            self.log(line)  # before/after answers
        self._print_next_steps(adapter_dir, model_dir, records)
        hosts.barrier("jlora: exports written")
        return result

    def _print_next_steps(self, adapter_dir: Path, model_dir: Path, records: list[dict]):
        from jlora.vllm_rules import smallest_max_lora_rank
        first, last = records[0]["loss"], records[-1]["loss"]
        evals = [r["eval_loss"] for r in records if "eval_loss" in r]
        max_rank = smallest_max_lora_rank(self.config.r)
        self.log(f"\nloss {first:.4f} -> {last:.4f}" + (f"; eval loss {evals[-1]:.4f}" if evals else ""))
        self.log(f"adapter (PEFT format): {adapter_dir}\nloss curve: {self.out / 'loss.png'}\n")
        self.log("Load it in PEFT (needs torch and peft, which jlora does not install; without a GPU take the CPU "
                 "build of torch first,\nas a plain `pip install peft` pulls ~3 GB of CUDA wheels):\n"
                 "  pip install torch --index-url https://download.pytorch.org/whl/cpu\n"
                 "  pip install peft\n"
                 "then in Python:\n"
                 "  from transformers import AutoModelForCausalLM\n  from peft import PeftModel\n"
                 f"  base = AutoModelForCausalLM.from_pretrained({str(model_dir.resolve())!r})\n"
                 f"  model = PeftModel.from_pretrained(base, {str(adapter_dir.resolve())!r})")
        if self.config.modules_to_save or self.config.trainable_token_indices:
            self.log("vLLM does not serve this adapter: its LoRA loads no trained embedding or head copies "
                     "(--modules-to-save) nor token rows (--trainable-token-indices), and an adapter cannot add "
                     f"tokens; serve the merged model instead ({self.out / 'merged'} with --merge)")
            return
        self.log("Serve it with vLLM:\n"
                 f"  vllm serve {model_dir.resolve()} --enable-lora --max-lora-rank {max_rank} "
                 f"--lora-modules jlora={adapter_dir.resolve()}")
