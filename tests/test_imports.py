"""Dependencies point one way: nothing in jlora imports a layer above its own.

Layers, lowest first (a module may import its own layer and the ones below):

    0 base      jlora (the package: public names load lazily, see jlora/__init__.py),
                jlora.atomic_files, jlora.host_malloc              (import nothing from jlora)
    1 nf4       jlora.nf4.*                                        NF4 tensor type, (de)quantization, bnb layout
    2 kernels   jlora.kernels.*  (kernels/)                        jax + the NF4 tensor type only
    3 model     jlora.llama_config, presets, rope, lora_layer, lora_config, module_patterns, dora,
                nf4_weight, llama, peft_model, qlora, memory, mesh_axes, kernel_sharding, attention.*, remat,
                models.*, trainable_tokens
    4 convert   jlora.convert.*  (convert/), jlora.vllm_rules      checkpoints and adapters in and out
                jlora.generate.*                                   KV cache, sampling, generate (model + loaders;
                                                                   below train, which samples during runs)
    5 data      jlora.data.*, jlora.default.*                      JSONL -> batches; the demo data and base
    6 train     jlora.train.*
    7 tools     jlora.plan.*, jlora.ranks.*                        planning and rank analysis (use train)
    8 commands  jlora.commands.*, jlora.cli

Every import counts, at module level or inside a function (a function-local import still runs, and
hiding an upward edge in a function was how the cycles here used to be broken). `from jlora import
Name` counts as an import of the module that defines Name (jlora/__init__.py's _EXPORTS); a bare
`import jlora` counts as an import of every one of them (the whole public API, up to convert).
jlora/__init__.py itself is the facade and is exempt: it names modules of every layer but imports
none of them until a name is used. There are no allowed exceptions, to either check.

Two checks: an `ast` walk of every .py under jlora/, kernels/ and convert/ (no upward edge, and no
cycle among modules); and, per package, a fresh interpreter that imports only that package and
reports which jlora modules it loaded (what really runs, including package __init__ files).
"""
from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"jlora": ROOT / "jlora", "jlora.kernels": ROOT / "kernels", "jlora.convert": ROOT / "convert"}

LAYERS = ["base", "nf4", "kernels", "model", "convert", "data", "train", "tools", "commands"]
# Module (or package prefix) -> layer; the longest matching prefix decides.
LAYER_OF = {
    "jlora": "base",
    "jlora.atomic_files": "base",
    "jlora.host_malloc": "base",
    "jlora.nf4": "nf4",
    "jlora.kernels": "kernels",
    **{f"jlora.{m}": "model" for m in (
        "llama_config", "presets", "rope", "lora_layer", "lora_config", "module_patterns", "nf4_weight",
        "llama", "peft_model", "qlora", "memory", "mesh_axes", "kernel_sharding", "attention", "remat",
        "models", "trainable_tokens", "dora")},
    "jlora.convert": "convert",
    "jlora.vllm_rules": "convert",
    "jlora.generate": "convert",
    "jlora.data": "data",
    "jlora.default": "data",
    "jlora.train": "train",
    "jlora.plan": "tools",
    "jlora.ranks": "tools",
    "jlora.commands": "commands",
    "jlora.cli": "commands",
}
# The NF4 modules the kernels may load: the tensor type and its decoding (plus quantize, which
# jlora/nf4/__init__.py binds eagerly); never the bitsandbytes file layout or anything above nf4.
KERNEL_NF4 = {"jlora.nf4", "jlora.nf4.tensor", "jlora.nf4.codebook", "jlora.nf4.dequantize",
              "jlora.nf4.double_quant", "jlora.nf4.torch_mean", "jlora.nf4.quantize"}


def layer(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER_OF and (n > 1 or len(parts) == 1):
            return LAYER_OF[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer: add it to LAYER_OF in tests/test_imports.py "
                         f"(and to the table in its docstring)")


def rank(module: str) -> int:
    return LAYERS.index(layer(module))


def _modules() -> dict[str, Path]:
    """Every module name under the three source roots -> its file."""
    out = {}
    for package, root in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "jlora" and parts and parts[0] in ("kernels", "convert"):
                continue  # not a real path; kernels/ and convert/ are mapped in pyproject
            out[name] = path
    return out


MODULES = _modules()


def _root_exports() -> dict[str, str]:
    """jlora's public names -> defining module: jlora/__init__.py's _EXPORTS and any eager imports."""
    tree = ast.parse((ROOT / "jlora" / "__init__.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            out.update(ast.literal_eval(node.value))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jlora"):
            out.update({a.asname or a.name: node.module for a in node.names})
    assert out, "jlora/__init__.py exports nothing"
    return out


EXPORTS = _root_exports()


def _targets(node, module: str, is_package: bool) -> list[str]:
    """The jlora modules an import statement loads (its named module, not the parents)."""
    if isinstance(node, ast.Import):
        out = []
        for alias in node.names:
            if alias.name == "jlora":
                out += sorted(set(EXPORTS.values()))
            elif alias.name.startswith("jlora."):
                out.append(alias.name)
        return out
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if base != "jlora" and not base.startswith("jlora."):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:
            out.append(sub)
        elif base == "jlora" and alias.name in EXPORTS:
            out.append(EXPORTS[alias.name])
        else:
            out.append(base)
    return out


def _edges() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import statement, at any depth, of every module."""
    edges = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path.name == "__init__.py"):
                    if target != module:
                        edges.append((module, target, node.lineno))
    return edges


EDGES = _edges()


def test_every_module_has_a_layer():
    missing = []
    for module in MODULES:
        try:
            layer(module)
        except AssertionError:
            missing.append(module)
    assert not missing, f"modules in no layer (add them to LAYER_OF and the docstring): {missing}"


def test_the_graph_sees_known_edges():
    """The checker itself: it finds top-level, function-local and `from jlora import Name` edges."""
    edges = {(a, b) for a, b, _ in EDGES}
    assert ("jlora.models.layers", "jlora.nf4_weight") in edges    # module level
    assert ("jlora.models.layers", "jlora.kernels") in edges       # inside Linear._fused
    assert ("jlora.kernels.nf4_lora_linear", "jlora.nf4.dequantize") in edges
    assert ("jlora.qlora", "jlora.nf4") in edges                   # from jlora import nf4
    assert ("jlora.train.sharding", "jlora.mesh_axes") in edges
    assert len(MODULES) > 100 and len(EDGES) > 300


def test_no_upward_import():
    """No module imports a layer above its own (the table in this file's docstring)."""
    upward = [f"{MODULES[a].relative_to(ROOT)}:{line}: {a} ({layer(a)}) imports {b} ({layer(b)})"
              for a, b, line in EDGES if a != "jlora" and rank(b) > rank(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    """No cycle among modules, counting function-local imports. Package __init__ re-exports
    are left out of the graph (a package importing its own submodules is not a dependency)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in EDGES:
        if MODULES[a].name == "__init__.py" and b.startswith(a + "."):
            continue
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m == "jlora" or m.startswith("jlora."))))
"""

# One representative import per package (the core model modules each on their own).
PACKAGES = ["jlora", "jlora.nf4", "jlora.kernels", "jlora.llama", "jlora.peft_model", "jlora.qlora",
            "jlora.kernel_sharding", "jlora.convert.hf_checkpoint", "jlora.convert", "jlora.data",
            "jlora.train", "jlora.plan", "jlora.ranks", "jlora.commands", "jlora.cli"]


@functools.cache
def _loaded(package: str) -> list[str]:
    run = subprocess.run([sys.executable, "-c", _PROBE, package], capture_output=True, text=True,
                         cwd=ROOT / "tests", timeout=300)
    assert run.returncode == 0, f"`import {package}` in a fresh interpreter failed:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_alone(package):
    """Imported alone in a fresh interpreter, a package loads nothing from a layer above its own."""
    loaded = _loaded(package)
    assert package in loaded
    above = [m for m in loaded if rank(m) > rank(package)]
    assert not above, f"`import {package}` ({layer(package)}) loaded modules of higher layers: {above}"


# What `import jlora` itself loads: the package and the host malloc setting it applies first.
BARE = {"jlora", "jlora.host_malloc"}


def test_kernels_load_only_kernels_and_the_nf4_type():
    loaded = set(_loaded("jlora.kernels"))
    assert loaded - KERNEL_NF4 - BARE == {m for m in loaded if m.startswith("jlora.kernels")}, loaded
    assert "jlora.nf4.bnb_layout" not in loaded


def test_bare_package_loads_nothing():
    """`import jlora` runs no submodule but the malloc setting: the public names load on first use."""
    assert _loaded("jlora") == sorted(BARE)


def test_public_names_resolve():
    """Every name jlora/__init__.py exports still resolves, and `jlora.nf4.*` keeps its functions."""
    code = ("import jlora, jlora.nf4.quantize, jlora.nf4.dequantize\n"
            "missing = [n for n in jlora.__all__ if getattr(jlora, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert callable(jlora.nf4.quantize) and callable(jlora.nf4.dequantize)\n"
            "assert callable(jlora.nf4.to_bnb_tensors) and jlora.NF4Weight is jlora.qlora.NF4Weight\n"
            "assert jlora.convert.peft_adapter.save_pretrained is jlora.save_pretrained\n"
            "from jlora import load_hf, get_peft_model, LoraConfig, nf4\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT / "tests", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
