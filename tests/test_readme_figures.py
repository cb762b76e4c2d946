"""The README's figures and counts (and docs/distributed.md's --plan table) are what the commands beside them
print: the ones cheap to compute (from the configs alone) are computed here and compared with the text, to the
precision the text gives."""

import re

import pytest

from dh_mlx.config import REPO_DIR, load_preset
from dh_mlx.domains import extract_config
from dh_mlx.params import count_params, kv_bytes_per_token
from dh_mlx.plan import plan

README = (REPO_DIR / "README.md").read_text()
DISTRIBUTED = (REPO_DIR / "docs" / "distributed.md").read_text()
UNITS = {"M": 1e6, "B": 1e9, "GiB": 2**30, "TiB": 2**40, "GB": 1e9}


def close(text: str, value: float) -> bool:
    """`text` ("42 M", "1.00 B", "116 GiB", "90.0") is `value` rounded to the digits it shows."""
    number, _, unit = text.strip().partition(" ")
    decimals = len(number.partition(".")[2])
    scale = UNITS.get(unit.strip(), 1.0)
    return abs(float(number.replace(",", "")) * scale - value) <= 0.5 * 10 ** -decimals * scale + 1e-9


def preset_rows() -> dict[str, list[str]]:
    table = README[README.index("## Size presets"):README.index("## Formats and interop")]
    rows = re.findall(r"^\| `(\w+)`(?: \(default\))? \|(.+)\|$", table, flags=re.M)
    return {name: [c.strip() for c in cells.split("|")] for name, cells in rows}


def test_the_preset_table_is_what_info_prints():
    rows = preset_rows()
    assert set(rows) == {"tiny", "1b", "5b", "30b", "500b"}
    for name, (total, active, mtp, experts, f32, _fits) in rows.items():
        config = load_preset(name)
        p = count_params(config)
        assert close(total, p.total) and close(active, p.active) and close(mtp, p.mtp), (name, total, active, mtp)
        assert experts == f"{config.n_routed_experts}, {config.num_experts_per_tok} per token", name
        assert close(f32, 4 * (p.total + p.mtp)), (name, f32)
        assert config.num_nextn_predict_layers == 1 and len(config.domain_routing.domains) == 10
    tiny = count_params(load_preset("tiny")).total
    assert re.search(r"tiny \((\d+) M parameters\)", README).group(1) == f"{tiny / 1e6:.0f}"


def test_the_kv_cache_figure():
    bf16 = int(re.search(r"`5b` needs ([\d,]+) bytes/token in bf16", README).group(1).replace(",", ""))
    assert bf16 == kv_bytes_per_token(load_preset("5b"), 2)


def test_domains_extract_writes_the_routed_experts_the_readme_names():
    line = next(l for l in README.splitlines() if "dh-mlx domains extract" in l)
    name = re.search(r"--name (\w+)", line).group(1)
    kept, total = map(int, re.search(r"# (\d+) of (\d+) routed experts", line).groups())
    config = load_preset("tiny")
    assert total == config.n_routed_experts
    assert kept == extract_config(config, name).n_routed_experts


PLAN_ROW = re.compile(r"^\| (\w+), (\d+) x (\d+), ([^|]+?) \| ([\d.,]+) / ([\d.,]+) / ([\d.,]+) GB \| "
                      r"([\d.,]+) GB, ([\d.]+) s \| ([\d.]+) GB per rank \|$", re.M)
LINKS = {"Thunderbolt 5": "thunderbolt5", "InfiniBand": "infiniband", "10 GbE": "10gbe", "NVLink": "nvlink"}


def test_the_plan_table_is_what_info_plan_prints():
    rows = PLAN_ROW.findall(DISTRIBUTED)
    assert len(rows) == 3
    for preset, machines, memory, link, dp, fsdp, pipe, sent, secs, serve4 in rows:
        p = plan(load_preset(preset), machines=int(machines), memory_gb=float(memory), link=LINKS[link])
        totals = {t["layout"]: t for t in p["training"]}
        assert close(dp, totals["data-parallel"]["total"] / 1e9) and close(fsdp, totals["FSDP"]["total"] / 1e9)
        assert close(pipe, totals["pipeline"]["total"] / 1e9), (preset, pipe)
        assert close(sent, totals["FSDP"]["bytes_per_step"] / 1e9) and close(secs, totals["FSDP"]["comm_seconds"])
        assert close(serve4, p["serving"][2]["weights_per_rank"] / 1e9), (preset, serve4)


@pytest.mark.parametrize("preset", ["500b"])
def test_the_plan_says_it_counts_the_mtp_module(preset):
    from dh_mlx.plan import format_plan
    p = plan(load_preset(preset), machines=8)
    c = count_params(load_preset(preset))
    assert p["params"] == c.total + c.mtp and p["params_without_mtp"] == c.total
    assert "with the MTP module, which every figure below counts" in format_plan(p, preset)
