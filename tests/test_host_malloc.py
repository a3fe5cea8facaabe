"""jlora/host_malloc.py: `jlora train` (or JLORA_KEEP_HOST_MEMORY=1) keeps freed host memory, so XLA:CPU's per-run
temporaries stop page-faulting, and asks for huge pages on that memory.

The reference is the kernel's own count of minor page faults (getrusage) against the executable's
temporary bytes as XLA reports them (`memory_analysis().temp_size_in_bytes`): with glibc's defaults
every run maps its temporaries afresh and faults on each 4 KiB page of them; with the setting it reuses
the previous run's pages. For huge pages, the kernel's AnonHugePages count in /proc/self/smaps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jlora import host_malloc

_PROBE = """
import jlora  # first, as the `jlora` command does
import json, resource, time
import jax, jax.numpy as jnp

def f(x):  # ~512 MB of temporaries (the 256 MB stack and the product), alive at once
    stack = jnp.stack([jnp.sin(x * i) for i in range(64)])
    return jnp.einsum("nij,jk->nik", stack, x).sum()

def run():  # as a training loop runs steps, with host work between them (here a pause); returns its faults
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    time.sleep(0.1)
    return faults

def resident_pages():
    return int(open("/proc/self/statm").read().split()[1])

x = jnp.ones((1024, 1024), jnp.float32)
compiled = jax.jit(f).lower(x).compile()
for _ in range(2):
    run()
resident = resident_pages()
faults = min(run() for _ in range(6))
growth = resident_pages() - resident
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
block = libc.malloc(256 << 20)  # 256 MiB as XLA allocates (plain malloc; numpy advises its own), touched:
ctypes.memset(block, 1, 256 << 20)  # how much of it do huge pages back?
huge_kb = sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("AnonHugePages:"))
print(json.dumps({"outcome": jlora.host_malloc.keep_freed_host_memory(), "faults": faults,
                  "temp_pages": compiled.memory_analysis().temp_size_in_bytes / 4096,
                  "resident_growth_pages": growth, "huge_pages": jlora.host_malloc.huge_pages(),
                  "huge_kb": huge_kb, "array_kb": 256 << 10}))
"""


def _probe(setting: str) -> dict:
    env = {"JAX_PLATFORMS": "cpu", host_malloc.ENV: setting}
    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two probe processes x six runs (~20 s on 2 cores); where it applies runs by default
@pytest.mark.skipif(host_malloc.glibc_version() is None or not sys.platform.startswith("linux"),
                    reason="the setting is glibc's (Linux)")
def test_runs_stop_faulting_on_their_temporaries():
    kept, default = _probe("1"), _probe("0")
    assert kept["outcome"] == "applied" and default["outcome"] == f"disabled by {host_malloc.ENV}=0"
    assert default["temp_pages"] > 50_000  # the probe has the large temporaries it means to have
    # glibc's defaults: every run maps its temporaries afresh and faults on each page (even the fewest of
    # six runs: the test can fail, this is the slowness).
    assert default["faults"] > 0.5 * default["temp_pages"], default
    # kept: runs reuse the previous run's pages, and the process does not keep growing. (A run that starts
    # before the last one's temporaries are freed, on a loaded machine, takes a second block once.)
    assert kept["faults"] < 0.05 * kept["temp_pages"], kept
    assert kept["resident_growth_pages"] < 2.5 * kept["temp_pages"], kept
    # Huge pages (the kernel's /proc/self/smaps count): where the kernel gives them only on request
    # ("madvise"), the kept heap is advised and backs a 256 MiB malloc block (and XLA's temporaries) with
    # them; glibc's defaults map that block on its own, with 4 KiB pages.
    if host_malloc.thp_mode() == "madvise":
        assert kept["huge_pages"].startswith("advised"), kept
        assert kept["huge_kb"] >= 0.5 * kept["array_kb"], kept
        assert default["huge_kb"] < 0.25 * default["array_kb"], default
    assert default["huge_pages"] == "not asked (the setting is off)", default


def test_settings_and_where_it_applies(monkeypatch):
    def outcome(**env):
        for name in (host_malloc.ENV, "JAX_PLATFORMS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return host_malloc._apply()  # pylint: disable=protected-access

    assert outcome(JLORA_KEEP_HOST_MEMORY="0") == "disabled by JLORA_KEEP_HOST_MEMORY=0"
    with pytest.warns(UserWarning, match="JLORA_KEEP_HOST_MEMORY='yes' is not 0 or 1"):
        assert outcome(JLORA_KEEP_HOST_MEMORY="yes") == "disabled: JLORA_KEEP_HOST_MEMORY='yes' is not 0 or 1"
    # By default only the `jlora train` command keeps its memory (compiling and decoding pay for one arena).
    monkeypatch.setattr(host_malloc.sys, "argv", ["python", "script.py", "train"])
    assert outcome(JAX_PLATFORMS="cpu").startswith("not the `jlora train` command")
    for argv in (["/venv/bin/jlora", "train", "--steps", "3"], ["-m", "train"]):
        assert host_malloc.training_command(argv), argv
    assert not host_malloc.training_command(["/venv/bin/jlora", "generate"])
    monkeypatch.setattr(host_malloc.sys, "argv", ["/venv/bin/jlora", "train"])
    if host_malloc.glibc_version() is None:
        assert outcome() == "not Linux with glibc"
        return
    assert outcome(JAX_PLATFORMS="tpu").startswith("an accelerator is present")
    assert outcome(JAX_PLATFORMS="cuda,cpu").startswith("an accelerator is present")
    assert outcome(JAX_PLATFORMS="cpu") == "applied"
    assert outcome(JAX_PLATFORMS="tpu", JLORA_KEEP_HOST_MEMORY="1") == "applied"
    monkeypatch.setattr(host_malloc.sys, "argv", ["python", "script.py"])
    assert outcome(JLORA_KEEP_HOST_MEMORY="1") == "applied"
    monkeypatch.setattr(host_malloc.sys, "argv", ["/venv/bin/jlora", "train"])
    monkeypatch.setattr(host_malloc.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    assert outcome().startswith("an accelerator is present")
    monkeypatch.setattr(host_malloc.glob, "glob", lambda pattern: [])
    assert outcome() == "applied"


def test_huge_pages_only_where_the_kernel_takes_advice(monkeypatch):
    """The heap is advised only under the "madvise" mode; "always" needs no advice, "never" takes none."""
    for mode, said in (("always", "not needed (transparent huge pages: always)"),
                       ("never", "not available (transparent huge pages: never)"),
                       (None, "not available (transparent huge pages: unknown)")):
        monkeypatch.setattr(host_malloc, "thp_mode", lambda mode=mode: mode)
        assert host_malloc._advise_huge_pages() == said  # pylint: disable=protected-access
