"""What MTP speculation costs and gains on a given checkpoint, at acceptance rates set by a synthetic draft.

`benchmarks/mtp.py` needs a model whose MTP module was trained; a random `1b` (what `decode.py` measures
against llama.cpp) has none that drafts anything useful. This script times the real speculative loop there
with a stand-in draft head of controlled quality: from a plain greedy run it takes, for each token, the token
that followed it (first occurrence), and spoils a share of those answers at random. The main model, the
2-token verify, the MTP module's forward (its logits replaced afterwards, so its cost is paid) and the cache
rollback are the real ones. Prints one JSON object per share: acceptance, MTP decode tokens/s and the ratio to
plain decoding measured in alternation in the same run (best of `--repeats`), plus the break-even acceptance
implied by the measured draft-step cost.

    python benchmarks/mtp_break_even.py [--params 1b] [--model DIR] [--gen-tokens 64] [--spoil 0 0.25 0.5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dh_mlx  # noqa: F401  (fast BLAS first)
from dh_mlx import backend
import mlx.core as mx
import numpy as np

from dh_mlx import load_preset, random_model
from dh_mlx.generation import GenerationStats, generate_tokens
from dh_mlx.generation.speculative import DraftPolicy
from dh_mlx.checkpoint.weights import with_mtp_module


def successor_draft(model, sequence: list[int], spoil: float, seed: int = 0):
    """An `mtp_forward` whose logits pick, for next token x, what followed x in `sequence`; a `spoil` share of
    the vocabulary gets a random wrong answer instead."""
    V = model.config.vocab_size
    rng = np.random.default_rng(seed)
    table = rng.integers(0, V, V)
    for a, b in reversed(list(zip(sequence, sequence[1:]))):
        table[a] = b
    spoilt = rng.random(V) < spoil
    table[spoilt] = (table[spoilt] + 1 + rng.integers(0, V - 1, spoilt.sum())) % V
    table = mx.array(table)
    real = model.mtp_forward

    def forward(hidden, next_tokens, *args, **kwargs):
        out = real(hidden, next_tokens, *args, **kwargs)
        onehot = mx.arange(V) == table[next_tokens][..., None]
        return out._replace(logits=out.logits * 0 + 10.0 * onehot)  # keeps the module's cost in the graph

    return forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="1b")
    ap.add_argument("--model", type=Path, help="a model directory instead of a random preset")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spoil", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    a = ap.parse_args()
    backend.setup()  # the CPU operations dh_mlx.load would set up
    if a.model:
        model = dh_mlx.load_model(a.model)
    else:  # as decode.py builds it: the bundled 8K vocabulary
        model = random_model(load_preset(a.params).replace(vocab_size=8192), seed=0)
    model = with_mtp_module(model)
    V = model.config.vocab_size
    prompt = np.random.default_rng(0).integers(3, V, a.prompt_tokens).tolist()

    def run(mtp: bool) -> tuple[list[int], GenerationStats]:
        s = GenerationStats()
        out = list(generate_tokens(model, prompt, max_tokens=a.gen_tokens, stats=s,
                                   mtp=DraftPolicy(adaptive=False) if mtp else False))
        return out, s

    plain, _ = run(False)
    real = model.mtp_forward
    for spoil in a.spoil:
        model.mtp_forward = successor_draft(model, prompt + plain, spoil)
        run(True)  # warm-up: traces and compiles the verify and draft steps
        best = {"plain": 0.0, "mtp": 0.0}
        for _ in range(a.repeats):  # alternate, so the machine's drift hits both alike
            out, s = run(False)
            best["plain"] = max(best["plain"], s.generation_tps)
            out_mtp, s_mtp = run(True)
            best["mtp"] = max(best["mtp"], s_mtp.generation_tps)
            if out_mtp != out:
                raise SystemExit("MTP decoding changed the greedy output")
        model.mtp_forward = real
        acc = s_mtp.acceptance_rate
        ratio = best["mtp"] / best["plain"]
        # tokens per draft step = 1 + acc, so a draft step costs (1 + acc) / ratio plain steps
        step_cost = (1 + acc) / ratio
        print(json.dumps({"name": "mtp_decode_speedup_synthetic_draft", "value": round(ratio, 3), "unit": "x",
                          "comparison": {"acceptance": round(acc, 3), "spoilt_share": spoil,
                                         "plain_tokens_per_s": round(best["plain"], 2),
                                         "mtp_tokens_per_s": round(best["mtp"], 2),
                                         "draft_step_cost_in_plain_steps": round(step_cost, 3),
                                         "break_even_acceptance": round(step_cost - 1, 3),
                                         "model": str(a.model or a.params), "greedy_output_identical": True}}),
              flush=True)


if __name__ == "__main__":
    main()
