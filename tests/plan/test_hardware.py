"""Topology names, the per-generation table, the default mesh and suggestion flags (no libtpu needed)."""
import pytest

from jlora.plan.hardware import CHIPS, GiB, parse_topology
from jlora.plan.planner import default_mesh
from jlora.plan.suggest import Suggestion, meshes


def test_table_matches_the_published_numbers():
    # shared/REFERENCE.md section 5 and the Cloud TPU / NVIDIA pages named in jlora/plan/hardware.py
    assert (CHIPS["v4"].hbm_bytes, CHIPS["v4"].peak_flops, CHIPS["v4"].hbm_bandwidth) == (32 * GiB, 275e12, 1200e9)
    assert (CHIPS["v5e"].hbm_bytes, CHIPS["v5e"].peak_flops, CHIPS["v5e"].hbm_bandwidth) == (16 * GiB, 197e12, 819e9)
    assert (CHIPS["v5p"].hbm_bytes, CHIPS["v5p"].peak_flops, CHIPS["v5p"].hbm_bandwidth) == (95 * GiB, 459e12, 2765e9)
    assert (CHIPS["v6e"].hbm_bytes, CHIPS["v6e"].peak_flops, CHIPS["v6e"].hbm_bandwidth) == (32 * GiB, 918e12, 1638e9)
    assert CHIPS["h100"].peak_flops == 989e12 and CHIPS["h100"].hbm_bandwidth == 3350e9


@pytest.mark.parametrize("name, generation, chips", [
    ("v5e:4x4", "v5e", 16), ("v5p:2x2x4", "v5p", 16), ("v4:2x2x1", "v4", 4), ("v6e:8x8", "v6e", 64),
    ("V5E:2x2", "v5e", 4), ("v5litepod:2x4", "v5e", 8), ("h100", "h100", 1), ("h200:8", "h200", 8)])
def test_parse_topology(name, generation, chips):
    t = parse_topology(name)
    assert (t.generation, t.chips) == (generation, chips)
    assert t.is_tpu == generation.startswith("v")


@pytest.mark.parametrize("name, match", [("v7:2x2", "unknown generation"), ("v5e", "chip grid"),
                                         ("v5e:4by4", "expected"), ("h100:2x4", "count")])
def test_bad_topology_says_what_was_expected(name, match):
    with pytest.raises(ValueError, match=match):
        parse_topology(name)


def test_default_mesh_puts_what_the_batch_allows_on_fsdp():
    assert default_mesh(4, 8) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert default_mesh(64, 8) == {"data": 1, "fsdp": 8, "tensor": 8}
    assert default_mesh(16, 12) == {"data": 1, "fsdp": 4, "tensor": 4}


def test_meshes_cover_every_factorisation():
    found = list(meshes(8))
    assert len(found) == 10  # ordered triples with product 8
    assert all(m["data"] * m["fsdp"] * m["tensor"] == 8 for m in found)


def test_suggestion_flags_are_jlora_train_flags():
    s = Suggestion("v5e:4x4", "full", {"data": 1, "fsdp": 4, "tensor": 4}, 4, 2, 1, True, "")
    assert s.flags() == "--mesh fsdp=4,tensor=4 --batch-size 4 --grad-accum 2 --remat full"
    import argparse
    from jlora.commands.train_settings import add_train_flags, settings_from_args
    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    config, _ = settings_from_args(parser.parse_args(s.flags().split()), demo=False)
    assert (config.mesh, config.batch_size, config.grad_accum, config.remat) == ("fsdp=4,tensor=4", 4, 2, "full")
