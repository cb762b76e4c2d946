"""`dh-mlx info --plan`: the layouts' memory per rank and bytes per step follow their definitions (16 bytes per
parameter, ring all-reduce, FSDP's gathers and reduce-scatter), split over the machines, timed on the link."""

import json
import subprocess
import sys

import pytest

from dh_mlx.config import load_preset
from dh_mlx.params import count_params
from dh_mlx.plan import LINKS, format_plan, plan


def params(name):
    p = count_params(load_preset(name))
    return p.total + p.mtp


@pytest.mark.parametrize("machines", [1, 2, 8])
def test_layouts_follow_their_definitions(machines):
    n = params("30b")
    p = plan(load_preset("30b"), machines=machines, memory_gb=192, link="infiniband")
    dp, fsdp, pp = p["training"]
    assert dp["weights"] + dp["gradients"] + dp["optimizer"] == 16 * n
    assert dp["bytes_per_step"] == pytest.approx(2 * (machines - 1) / machines * 2 * n)
    assert fsdp["bytes_per_step"] == pytest.approx(1.5 * dp["bytes_per_step"])
    assert fsdp["gradients"] + fsdp["optimizer"] == pytest.approx(14 * n / machines)
    assert pp["weights"] == pytest.approx(2 * n / machines) and pp["activations"] == dp["activations"]
    for t in p["training"]:
        assert t["comm_seconds"] == pytest.approx(t["bytes_per_step"] / LINKS["infiniband"][1])
        assert t["fits"] == (t["total"] <= 192e9)
    assert (machines == 1) == (dp["bytes_per_step"] == 0 == pp["bytes_per_step"])


def test_what_the_big_presets_need():
    p30 = plan(load_preset("30b"), machines=4, memory_gb=192)
    assert [t["fits"] for t in p30["training"]] == [False, True, True]  # 0.5 TB per rank for data-parallel
    p500 = plan(load_preset("500b"), machines=4, memory_gb=192)
    assert not any(t["fits"] for t in p500["training"])
    assert p500["fsdp_machines_needed"] * 192e9 >= 16 * params("500b")
    assert p500["serving_machines_needed"]["4-bit"] == 2 and p500["serving_machines_needed"]["bf16"] >= 6
    text = format_plan(p500, "preset 500b")
    assert "ESTIMATES" in text and "Thunderbolt 5 (10 GB/s one way, nominal)" in text


def test_cli():
    r = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "info", "--params", "5b", "--plan", "--machines", "4",
                        "--link", "10gbe", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["machines"] == 4 and data["link"] == "10 GbE" and len(data["training"]) == 3
    bad = subprocess.run([sys.executable, "-m", "dh_mlx.cli", "info", "--plan", "--link", "carrier-pigeon"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--link must be one of 10gbe" in bad.stderr
