"""The router's one rule (`DomainRouting.table`, group-limited top-k, the selection bias), as the MLX reference,
its CPU kernel and the PyTorch twin apply it: the same experts and mixing weights for every token, with and
without domain ids, groups and added domains."""

import contextlib

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import ops
from dh_mlx.config import DomainRouting
from dh_mlx.model import moe
from helpers import make_config

torch = pytest.importorskip("torch")

CASES = {  # 16 routed experts, 4 groups of which 2 are kept, 3 per token
    "groups": dict(),
    "domains": dict(domain_routing=DomainRouting(domains=["code", "math", "law"], experts_per_domain=3)),
    "added": dict(domain_routing=DomainRouting(domains=["code", "math"], experts_per_domain=3, added=["law"]),
                  n_routed_experts=19),  # 16 in the groups, the added domain's 3 after them
    "softmax_greedy": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1),
}


def _config(name):
    return make_config(**{**dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                                 routed_scaling_factor=2.5), **CASES[name]})


@pytest.mark.parametrize("name", list(CASES))
def test_the_reference_the_cpu_kernel_and_the_twin_route_alike(name, monkeypatch):
    from dh_mlx.backend.cpu import experts
    from dh_mlx.torch.moe import MoEGate as TwinGate
    native_calls = []
    kernel = experts.native_route
    monkeypatch.setattr(experts, "native_route", lambda *a: native_calls.append(a[4]) or kernel(*a))
    c = _config(name)
    rng = np.random.default_rng(0)
    B, T, D, E = 3, 11, c.hidden_size, c.n_routed_experts
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    w = rng.standard_normal((E, D)).astype(np.float32) * 0.3
    bias = rng.standard_normal(E).astype(np.float32) * 0.2
    n_ids = len(c.domain_routing.names) if c.domain_routing else 1
    ids = rng.integers(-1, n_ids, (B, T))

    gate = moe.MoEGate(c)
    gate.weight = mx.array(w)
    if "e_score_correction_bias" in gate:
        gate.e_score_correction_bias = mx.array(bias)
    twin = TwinGate(c)
    with torch.no_grad():
        twin.weight.copy_(torch.tensor(w))
        if c.topk_method == "noaux_tc":
            twin.e_score_correction_bias.copy_(torch.tensor(bias))

    results = []
    for impl in ("cpu", "reference"):
        for domain_ids in (None, mx.array(ids)):
            with contextlib.nullcontext() if impl == "cpu" else ops.reference_only():
                r = gate(mx.array(x), domain_ids)
            results.append((np.sort(np.array(r.indices), -1), np.take_along_axis(
                np.array(r.weights), np.argsort(np.array(r.indices), -1), -1)))
    assert "route" in ops.registered()
    if name != "added":  # the native kernel ran both CPU calls (an added domain's experts: the reference)
        assert native_calls == [False, c.domain_routing is not None]
    with torch.no_grad():
        for domain_ids in (None, torch.tensor(ids)):
            r = twin(torch.tensor(x), domain_ids)
            i = r.indices.numpy()
            results.append((np.sort(i, -1), np.take_along_axis(r.weights.numpy(), np.argsort(i, -1), -1)))

    cpu_plain, cpu_dom, ref_plain, ref_dom, twin_plain, twin_dom = results
    for a, b in ((cpu_plain, ref_plain), (twin_plain, ref_plain), (cpu_dom, ref_dom), (twin_dom, ref_dom)):
        assert (a[0] == b[0]).all()
        assert np.abs(a[1] - b[1]).max() <= 1e-6
    table = np.array(c.domain_routing.table(E)) if c.domain_routing else np.ones((1, E), bool)
    chosen = ref_dom[0] if c.domain_routing else ref_plain[0]
    rows = table[ids + 1] if c.domain_routing else table[np.zeros_like(ids)]
    assert np.take_along_axis(rows, chosen, -1).all()  # every token chose among its row's experts
    if c.domain_routing:
        assert (ref_dom[0] != ref_plain[0]).any()  # the ids changed some choices
        base = c.domain_routing.base_experts(E)
        assert (ref_plain[0] < base).all()  # no id: never an added domain's expert
        assert np.isclose(ref_plain[1].sum(-1), c.routed_scaling_factor, atol=1e-5).all()


def test_the_table_is_the_base_experts_then_each_domains_own_and_the_common_ones():
    dr = DomainRouting(domains=["code", "math"], experts_per_domain=2, added=["law"])
    t = np.array(dr.table(8))  # code 0-1, math 2-3, common 4-5, law (added) 6-7
    assert t.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0],
                          [0, 0, 0, 0, 1, 1, 1, 1]]
