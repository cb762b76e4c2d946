"""MTP self-speculative decoding on a model trained with MTP: acceptance rate and decode speedup (greedy,
output identical to plain decoding), prompts taken from the held-out validation documents.

    python benchmarks/mtp.py --model runs/tiny [--prompts 8] [--gen-tokens 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dh_mlx
from dh_mlx.generate import GenerationStats, generate_tokens
from dh_mlx.train.data import load_dataset
from dh_mlx.train.run import DEFAULT_DATA


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path("runs/tiny"))
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    a = ap.parse_args()
    model, tok = dh_mlx.load(a.model)
    if not model.config.num_nextn_predict_layers:
        raise SystemExit(f"{a.model}: has no MTP module")
    data = load_dataset(a.data, tok, seq_len=a.prompt_tokens, seed=0)  # same split as training (seed 0)
    rows = data.valid.tokens[: a.prompts, : a.prompt_tokens].tolist()
    list(generate_tokens(model, rows[0][:16], max_tokens=4))
    list(generate_tokens(model, rows[0][:16], max_tokens=4, mtp=True))
    plain, spec = GenerationStats(), GenerationStats()
    same = True
    t_plain = t_spec = 0.0
    for prompt in rows:
        s1, s2 = GenerationStats(), GenerationStats()
        a_out = list(generate_tokens(model, prompt, max_tokens=a.gen_tokens, stats=s1))
        b_out = list(generate_tokens(model, prompt, max_tokens=a.gen_tokens, mtp=True, stats=s2))
        same &= a_out == b_out
        t_plain += s1.generation_tokens / s1.generation_tps
        t_spec += s2.generation_tokens / s2.generation_tps
        plain.generation_tokens += s1.generation_tokens
        spec.generation_tokens += s2.generation_tokens
        spec.drafted += s2.drafted
        spec.accepted += s2.accepted
    print(json.dumps({"name": "mtp_acceptance_rate", "value": round(spec.acceptance_rate, 3), "unit": "fraction",
                      "comparison": {"drafted": spec.drafted, "accepted": spec.accepted, "model": str(a.model)}}))
    print(json.dumps({"name": "mtp_decode_speedup", "value": round((spec.generation_tokens / t_spec) /
                                                                    (plain.generation_tokens / t_plain), 3),
                      "unit": "x", "comparison": {"plain_tokens_per_s": round(plain.generation_tokens / t_plain, 1),
                                                  "mtp_tokens_per_s": round(spec.generation_tokens / t_spec, 1),
                                                  "greedy_output_identical": same}}))


if __name__ == "__main__":
    main()
