"""Run as a script: every `jlora plan` job of test_plan_tpu.py, one after another, results into OUTDIR.

    python run_plans.py OUTDIR
writes OUTDIR/<job>.out (stdout: JSON), <job>.err and <job>.rc. tests/plan/conftest.py starts it when
collection ends, so the compiles (~7 min of one core with libtpu 0.0.42) run beside the other tests.
Jobs run in sequence: two 8B compiles at once would hold ~12 GB of host memory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
# 8 layers of 4M parameters: as in real runs, FSDP gathers one layer at a time, a small part of the
# weights (78 MB in bf16), and the weights outweigh the activations of 8 x 128 tokens.
SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
         "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
         "vocab_size": 8000, "max_position_embeddings": 512}


def jobs(out: Path) -> dict[str, list[str]]:
    small, two_layers = out / "small", out / "two_layers"  # two layers for the 11 kernel-step compiles
    for path, config in ((small, SMALL), (two_layers, {**SMALL, "num_hidden_layers": 2})):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config))
    plan = [sys.executable, "-m", "jlora.cli", "plan", "--json", "--topology", "v5e:2x2"]
    return {
        "70b": plan + ["--model", "llama-3.1-70b", "--batch-size", "8", "--seq-len", "4096"],
        "small": [sys.executable, str(HERE / "tiny_plans.py"), str(small)],
        "kernels": [sys.executable, str(HERE / "kernel_plans.py"), str(two_layers)],
        "8b": plan + ["--model", "llama-3.1-8b", "--r", "16", "--batch-size", "8", "--seq-len", "2048"],
        "8b-nf4": plan + ["--model", "llama-3.1-8b", "--quantize", "nf4", "--r", "16", "--batch-size", "8",
                          "--seq-len", "2048", "--remat", "full", "--no-suggest"],
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost"}
    for name, command in jobs(out).items():
        with open(out / f"{name}.out", "w") as stdout, open(out / f"{name}.err", "w") as stderr:
            rc = subprocess.run(command, env=env, stdout=stdout, stderr=stderr, timeout=1800).returncode
        (out / f"{name}.rc").write_text(str(rc))
