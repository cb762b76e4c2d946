"""MTP self-speculative decoding on a model trained with MTP (greedy, prompts from the held-out validation
documents): the acceptance rate and decode speed of drafting every step, and of the default adaptive policy
(`DraftPolicy`: drafts only while it measures faster), each against plain decoding in the same run, with
the greedy output checked identical; then the acceptance when sampling (`--temps`).

    python benchmarks/mtp.py --model runs/tiny [--prompts 8] [--gen-tokens 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dh_mlx
from dh_mlx import backend
from dh_mlx.generation import GenerationStats, generate_tokens
from dh_mlx.generation.options import SamplingOptions
from dh_mlx.generation.speculative import DraftPolicy
from dh_mlx.train.data import load_dataset
from dh_mlx.train.run import DEFAULT_DATA


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--temps", type=float, nargs="*", default=[0.7, 1.0],
                    help="also the acceptance when sampling at these temperatures (drafting every step)")
    a = ap.parse_args()
    backend.setup()  # the CPU operations dh_mlx.load would set up
    model, tok = dh_mlx.load(a.model)
    if not model.config.num_nextn_predict_layers:
        raise SystemExit(f"{a.model}: has no MTP module")
    data = load_dataset(a.data, tok, seq_len=a.prompt_tokens, seed=0)  # same split as training (seed 0)
    rows = data.valid.tokens[: a.prompts, : a.prompt_tokens].tolist()
    modes = {"plain": dict(mtp=False), "always_draft": dict(mtp=True, adaptive=False),
             "adaptive": dict(mtp=True, adaptive=True)}

    def run(prompt, mtp, adaptive=True, max_tokens=a.gen_tokens, **sampling):
        s = GenerationStats()
        out = list(generate_tokens(model, prompt, max_tokens=max_tokens, stats=s, sampling=SamplingOptions(**sampling),
                                   mtp=DraftPolicy(adaptive=adaptive) if mtp else False))
        return out, s

    for kw in modes.values():  # compile and warm up every path
        run(rows[0][:16], max_tokens=8, **kw)
    seconds = dict.fromkeys(modes, 0.0)
    tokens, drafted, accepted = dict.fromkeys(modes, 0), dict.fromkeys(modes, 0), dict.fromkeys(modes, 0)
    same = True
    for prompt in rows:  # the modes alternate per prompt, so the machine's drift hits all alike
        outs = {}
        for name, kw in modes.items():
            outs[name], s = run(prompt, **kw)
            seconds[name] += s.generation_tokens / s.generation_tps
            tokens[name] += s.generation_tokens
            drafted[name] += s.drafted
            accepted[name] += s.accepted
        same &= outs["always_draft"] == outs["plain"] == outs["adaptive"]
    tps = {k: tokens[k] / seconds[k] for k in modes}
    greedy = accepted["always_draft"] / drafted["always_draft"]
    print(json.dumps({"name": "mtp_acceptance_rate", "value": round(greedy, 3),
                      "unit": "fraction", "comparison": {"drafted": drafted["always_draft"],
                                                         "accepted": accepted["always_draft"], "model": str(a.model)}}))
    for name in ("always_draft", "adaptive"):
        print(json.dumps({"name": f"mtp_decode_speedup_{name}", "value": round(tps[name] / tps["plain"], 3),
                          "unit": "x", "comparison": {"plain_tokens_per_s": round(tps["plain"], 1),
                                                      "mtp_tokens_per_s": round(tps[name], 1),
                                                      "drafted": drafted[name], "accepted": accepted[name],
                                                      "greedy_output_identical": same}}))
    for temp in a.temps:  # speculative sampling accepts with probability min(1, p/q): distribution quality
        runs = [run(prompt, mtp=True, adaptive=False, temp=temp, seed=i)[1] for i, prompt in enumerate(rows)]
        n_drafted, n_accepted = sum(s.drafted for s in runs), sum(s.accepted for s in runs)
        print(json.dumps({"name": f"mtp_acceptance_rate_temp_{temp}", "value": round(n_accepted / n_drafted, 3),
                          "unit": "fraction", "comparison": {"drafted": n_drafted, "accepted": n_accepted,
                                                             "greedy": round(greedy, 3), "model": str(a.model)}}))


if __name__ == "__main__":
    main()
