"""Domain experts on the bundled corpus: per-domain validation perplexity with the true domain id, without one and
with `--domain auto` (and how often auto picks the true domain); a dense model with the same active parameters
trained on the same tokens; a held-out domain added (`domains add`) beside full fine-tuning on the same data
and steps, with the forgetting each causes; a domain removed and one extracted. One JSON object per result.

    python benchmarks/domains.py [--steps 200] [--add-steps 100] [--held-out legal] [--work DIR]

The base model is the `tiny` architecture with one domain per trained domain of the corpus (the held-out one
aside, `experts_per_domain` 5 of 24 routed experts, 4 common), trained with `dh-mlx train`'s defaults; about
12 minutes on 2 cores. Validation documents are each run's own held-out split, scored one document at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import dh_mlx  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx

from dh_mlx import load_model
from dh_mlx.checkpoint.domains import extract_domain, remove_domain
from dh_mlx.convert.mlx import dir_bytes
from dh_mlx.config import DATA_DIR, load_preset
from dh_mlx.generation.domains import infer_domain
from dh_mlx.params import count_params
from dh_mlx.tokenizer import load_tokenizer
from dh_mlx.train.data import read_jsonl, split_documents, tokenize
from dh_mlx.train.domain_add import add_domain
from dh_mlx.train.run import train

CORPUS = DATA_DIR / "train_data.jsonl"
SEQ = 128


def emit(**record) -> None:
    from dh_mlx import backend
    record.setdefault("cpu", backend.describe()["cpu"])
    print(json.dumps(record), flush=True)


def documents(path: Path, tok, domains: list[str]):
    """The held-out documents of `path` as `dh-mlx train` splits them (same seed and fraction)."""
    docs = [tokenize(r, tok, domains) for r in read_jsonl(path, domains=domains)]
    return split_documents(docs, 0.05, 0)[1]


def ppl(model, docs, route, names: list[str]) -> dict[str, float]:
    """Per-domain perplexity of `docs` (labelled by `names[doc.domain]`); `route(doc)` is the domain id the
    model routes each by (None: no id)."""
    nll: dict[str, float] = {}
    count: dict[str, float] = {}
    for d in docs:
        ids = d.ids[: SEQ + 1]
        r = route(d)
        logits = model(mx.array(ids[None, :-1]), domain_ids=None if r is None else mx.array([r]))[0]
        lp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        key = names[d.domain]
        nll[key] = nll.get(key, 0.0) - mx.take_along_axis(lp, mx.array(ids[1:])[:, None], 1).sum().item()
        count[key] = count.get(key, 0.0) + len(ids) - 1
    return {k: round(math.exp(nll[k] / count[k]), 3) for k in sorted(nll)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--add-steps", type=int, default=100)
    p.add_argument("--held-out", default="legal")
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="dh-domains-"))
    work.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    domains = sorted({r["domain"] for r in records if r.get("domain")} - {a.held_out})
    (work / "base.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r.get("domain") != a.held_out))
    held = [r for r in records if r.get("domain") == a.held_out]
    (work / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    (work / "new-untagged.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "domain"})
                                                     + "\n" for r in held))
    tiny = load_preset("tiny").to_dict()
    moe = {**tiny, "domain_routing": {"domains": domains, "experts_per_domain": 5}}
    E = tiny["n_routed_experts"]
    # dense: every layer an MLP as wide as the MoE layers' active width (shared + top-k experts), so the active
    # parameters per token match
    width = (tiny["first_k_dense_replace"] * tiny["intermediate_size"] + (tiny["num_hidden_layers"] - tiny[
        "first_k_dense_replace"]) * tiny["moe_intermediate_size"] * (tiny["n_shared_experts"] + tiny[
            "num_experts_per_tok"])) // tiny["num_hidden_layers"]
    dense = {**{k: v for k, v in tiny.items() if k not in ("domain_routing",)}, "n_routed_experts": None,
             "n_shared_experts": None, "intermediate_size": width, "first_k_dense_replace": 0}
    for name, cfg in (("moe", moe), ("dense", dense)):
        (work / f"{name}.json").write_text(json.dumps(cfg))
        if not (work / name / "config.json").exists():
            train(config=work / f"{name}.json", data=work / "base.jsonl", out=work / name, steps=a.steps,
                  progress=False, force=True)
    tok = load_tokenizer(work / "moe")
    base = load_model(work / "moe")
    docs = documents(work / "base.jsonl", tok, domains)
    with_id = ppl(base, docs, lambda d: d.domain, domains)
    without = ppl(base, docs, lambda d: None, domains)
    picks = {id(d): infer_domain(base, list(d.ids[:256]))[0] for d in docs}
    auto = ppl(base, docs, lambda d: picks[id(d)], domains)
    right = sum(picks[id(d)] == d.domain for d in docs) / len(docs)
    dense_model = load_model(work / "dense")
    pa, pd = count_params(base.config), count_params(dense_model.config)
    emit(benchmark="domains_perplexity", steps=a.steps, documents=len(docs), with_id=with_id, without_id=without,
         auto=auto, auto_accuracy=round(right, 3), dense=ppl(dense_model, docs, lambda d: None, domains),
         moe_active_params=pa.active, dense_active_params=pd.active, moe_total_params=pa.total,
         dense_total_params=pd.total)

    # add the held-out domain; beside it, full fine-tuning on the same records and steps
    added_dir, tuned_dir = work / "added", work / "tuned"
    if not (added_dir / "config.json").exists():
        add_domain(model=work / "moe", name=a.held_out, data=work / "new.jsonl", out=added_dir, steps=a.add_steps,
                   progress=False, force=True)
    if not (tuned_dir / "config.json").exists():
        train(init=work / "moe", tokenizer=work / "moe", data=work / "new-untagged.jsonl", out=tuned_dir,
              steps=a.add_steps, progress=False, force=True)
    added, tuned = load_model(added_dir), load_model(tuned_dir)
    names = added.config.domain_routing.names
    new_id = names.index(a.held_out)
    new_docs = documents(work / "new.jsonl", tok, names)
    emit(benchmark="domains_add", domain=a.held_out, steps=a.add_steps,
         old_with_id_before=with_id, old_with_id_after=ppl(added, docs, lambda d: d.domain, domains),
         old_without_id_before=without, old_without_id_after=ppl(added, docs, lambda d: None, domains),
         new_base_without_id=ppl(base, new_docs, lambda d: None, names)[a.held_out],
         new_added_with_id=ppl(added, new_docs, lambda d: new_id, names)[a.held_out],
         full_finetune_new=ppl(tuned, new_docs, lambda d: None, names)[a.held_out],
         full_finetune_old_with_id=ppl(tuned, docs, lambda d: d.domain, domains),
         full_finetune_old_without_id=ppl(tuned, docs, lambda d: None, domains))

    # remove one domain, extract another
    gone, kept = domains[-1], domains[0]
    remove_domain(work / "moe", gone, work / "removed", force=True)
    extract_domain(work / "moe", kept, work / "extracted", force=True)
    removed, extracted = load_model(work / "removed"), load_model(work / "extracted")
    renumber = {i: removed.config.domain_routing.domain_id(n) for i, n in enumerate(domains) if n != gone}
    others = [d for d in docs if domains[d.domain] != gone]
    mine = [d for d in docs if domains[d.domain] == kept]
    diff = max(mx.abs(extracted(mx.array(d.ids[None, :SEQ])) - base(mx.array(d.ids[None, :SEQ]),
                                                                    domain_ids=mx.array([d.domain]))).max().item()
               for d in mine)
    emit(benchmark="domains_remove", domain=gone, others_before=ppl(base, others, lambda d: d.domain, domains),
         others_after=ppl(removed, others, lambda d: renumber[d.domain], domains),
         removed_with_id_before=with_id[gone],
         removed_without_id_after=ppl(removed, [d for d in docs if domains[d.domain] == gone], lambda d: None,
                                      domains)[gone])
    emit(benchmark="domains_extract", domain=kept, routed_experts=f"{extracted.config.n_routed_experts} of {E}",
         bytes=dir_bytes(work / "extracted"), full_bytes=dir_bytes(work / "moe"), max_abs_logit_diff=diff,
         perplexity_full_with_id=with_id[kept],
         perplexity_extracted=ppl(extracted, mine, lambda d: None, domains)[kept])


if __name__ == "__main__":
    main()
