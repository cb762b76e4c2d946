"""The twin trains on what MLX trains on: one `dh-mlx train` step (MLX) and one twin step, from the same checkpoint
on the same packed batch from the real data pipeline (several documents per row, prompt/completion records with
their prompts masked, chat records with their non-assistant turns masked, domain ids on some rows), give the same
loss terms, the same updated weights and the same ALF-moved router biases; and the same learning rate at every
step of the schedule."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dh_mlx import load_model
from dh_mlx.config import DomainRouting
from dh_mlx.train.config import TrainConfig
from dh_mlx.train.data import load_dataset
from dh_mlx.train.loss import Batch
from dh_mlx.train.trainer import build_steps, make_optimizer
from helpers import make_checkpoint, make_config, write_records

torch = pytest.importorskip("torch")

DOMAINS = ["code", "math"]  # the domain-routed model also has an added domain, "legal" (experts 8-9)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(directory with data.jsonl and its tokenizer in tok/, a numpy batch of 4 packed rows of 48 tokens)."""
    from dh_mlx.train.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("twin_train")
    write_records(d / "data.jsonl")
    tok = train_tokenizer(d / "data.jsonl", d / "tok", vocab_size=400)
    ds = load_dataset(d / "data.jsonl", tok, seq_len=48, domains=DOMAINS + ["legal"], val_fraction=0.0, seed=0)
    b = next(iter(ds.train_batches(4, seed=0)))
    # What makes this batch a test of the masks: rows of several documents, masked prompts and turns inside
    # documents, domain ids on some tokens and none on others.
    per_row = [len(set(s[s >= 0].tolist())) for s in b.segment_ids]
    assert min(per_row) >= 3, per_row
    inside = b.segment_ids[:, 1:] == b.segment_ids[:, :-1]
    assert (b.loss_mask[:, 1:][inside] == 0).sum() >= 40 and (b.loss_mask == 1).sum() >= 60
    assert (b.domain_ids >= 0).any() and (b.domain_ids < 0).any() and (b.domain_ids == 2).any()
    return d, b


MODELS = {
    "mtp": dict(name="q_lora+groups+yarn+mtp"),
    # the 2 experts after the 8 base ones belong to a domain added later ("legal"): ALF leaves their biases
    "domains": dict(name="q_lora+groups+yarn+mtp", n_routed_experts=10,
                    domain_routing=DomainRouting(domains=DOMAINS, experts_per_domain=2, added=["legal"])),
    # two MTP modules: MLX trains depth 1 only (its MTP term is depth 1's, not the depths' mean); the depth-2
    # module gets zero gradients, so AdamW only decays its weights, and ALF leaves its router bias
    "mtp2": dict(name="q_lora+groups+yarn+mtp", num_nextn_predict_layers=2),
}
# Warmup (the first step's learning rate is lr / 5), cosine afterwards, clipping active (the norms are ~4).
CFG = dict(steps=40, warmup_steps=5, lr=4e-3, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=0.05, alf_gamma=1e-3,
           balance_alpha=1e-2, mtp_lambda=0.3, batch_size=4, seq_len=48)
TERMS = ("loss", "ce", "mtp", "balance")


def checkpoint(path, model: str, vocab: int):
    spec = dict(MODELS[model])
    make_checkpoint(path, spec.pop("name"), vocab_size=vocab, **spec)
    return path


def mlx_steps(path, batch, cfg: TrainConfig, n: int) -> list[tuple[dict, dict]]:
    """`dh-mlx train`'s compiled step run `n` times on `batch`: after each, its terms and the model's tensors."""
    ours = load_model(path)
    ours.freeze(keys=["e_score_correction_bias"], strict=False)  # as train/run.py does
    opt = make_optimizer(cfg)
    fns = build_steps(ours, opt, cfg)
    arrays = Batch(*(mx.array(a) for a in batch))
    out = []
    for _ in range(n):
        loss, ce, mtp, bal, loads, norm = fns.step(*arrays)
        fns.eval(loss, ce, mtp, bal, loads, norm)
        terms = dict(loss=loss.item(), ce=ce.item(), mtp=mtp.item(), balance=bal.item(), grad_norm=norm.item(),
                     lr=opt.learning_rate.item())
        out.append((terms, {k: np.array(v) for k, v in tree_flatten(ours.parameters())}))
    return out


@pytest.mark.parametrize("model", list(MODELS))
def test_document_masked_logits_equal_mlx_on_both_attention_paths(tmp_path, data, model):
    """The twin's model takes the (B, 1, T, T) document mask through every layer and the MTP module, on MLA's
    naive and absorbed paths, and gives MLX's logits and routing."""
    import dh_mlx.torch as twin
    from dh_mlx.train.loss import document_mask
    _, b = data
    ours = load_model(checkpoint(tmp_path, model, 400))
    mask = document_mask(mx.array(b.segment_ids))
    out = ours.forward(mx.array(b.inputs), domain_ids=mx.array(b.domain_ids), mask=mask)
    mtp = ours.mtp_forward(out.hidden[:, :-1], mx.array(b.targets[:, :-1]), 0,
                           domain_ids=mx.array(b.domain_ids[:, :-1]), mask=mask[..., :-1, :-1])
    causal = np.array(ours(mx.array(b.inputs), domain_ids=mx.array(b.domain_ids)))
    assert np.abs(causal - np.array(out.logits)).max() > 1e-2  # the mask matters for these rows
    theirs = twin.load_model(tmp_path, device="cpu", dtype=torch.float32)
    tb = twin.Batch.from_numpy(b)
    tmask = twin.document_mask(tb.segment_ids)
    assert np.array_equal(tmask.numpy(), np.array(mask))
    for absorb in (False, True):
        theirs.set_absorb(absorb)
        with torch.no_grad():
            t_out = theirs.forward_full(tb.inputs, domain_ids=tb.domain_ids, mask=tmask)
            t_mtp = theirs.mtp_forward(t_out.hidden[:, :-1], tb.targets[:, :-1], 0,
                                       domain_ids=tb.domain_ids[:, :-1], mask=tmask[..., :-1, :-1])
        assert np.abs(t_out.logits.numpy() - np.array(out.logits)).max() <= 1e-4, absorb
        assert np.abs(t_mtp.logits.numpy() - np.array(mtp.logits)).max() <= 1e-4, absorb
        for r, tr in zip(out.routing + mtp.routing, t_out.routing + t_mtp.routing, strict=True):
            assert np.array_equal(np.sort(np.array(r.indices), -1), np.sort(tr.indices.numpy(), -1))


@pytest.mark.parametrize("model", list(MODELS))
def test_steps_on_packed_masked_batches_match_the_twin(tmp_path, data, model):
    import dh_mlx.torch as twin
    d, batch = data
    first = load_model(checkpoint(tmp_path, model, 400))
    start = {k: np.array(v) for k, v in tree_flatten(first.parameters())}
    cfg = TrainConfig(**CFG)
    ours = mlx_steps(tmp_path, batch, cfg, 2)

    theirs = twin.load_model(tmp_path, device="cpu", dtype=torch.float32)
    opt = twin.make_optimizer(theirs, cfg)
    tb = twin.Batch.from_numpy(batch)
    for i, (want, weights) in enumerate(ours):
        got = twin.train_step(theirs, opt, tb, cfg)
        assert want["mtp"] > 1 and want["balance"] > 1e-3 and want["grad_norm"] > 10 * cfg.grad_clip
        for k in TERMS:
            assert abs(got[k] - want[k]) <= 1e-5, (i, k, got[k], want[k])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-6)
        w = cfg.warmup_steps  # warming up: lr / w, then (lr - lr / w) / w more per step
        assert want["lr"] == pytest.approx(cfg.lr / w + i * (cfg.lr - cfg.lr / w) / w, rel=1e-6)
        state = {k: v.numpy() for k, v in theirs.state_dict().items()}
        assert set(weights) == set(state)
        for k, v in weights.items():  # every parameter, and the router biases
            assert np.abs(state[k] - v).max() <= 1e-5, (i, k, np.abs(state[k] - v).max())
    unused = f"model.layers.{first.config.num_hidden_layers + 1}."  # the depth-2 MTP module, if any
    moved = {k: np.abs(v - start[k]).max() for k, v in weights.items() if not k.startswith(unused)}
    assert sum(m > 1e-4 for m in moved.values()) >= 0.9 * len(moved), moved  # (updates of ~lr/5, not ~0)
    biases = sorted(k for k in weights if k.endswith("e_score_correction_bias"))
    depth2 = [k for k in weights if k.startswith(unused)]
    assert len(biases) == 3 + (model == "mtp2") and bool(depth2) == (model == "mtp2")  # main stack's 2, MTP's
    decay = np.prod([1 - want["lr"] * cfg.weight_decay for want, _ in ours])
    for k in depth2:  # no gradient reaches it: weight decay alone, and ALF leaves its bias
        want = start[k] if k.endswith("e_score_correction_bias") else start[k] * decay
        np.testing.assert_allclose(weights[k], want, rtol=1e-6, atol=1e-9, err_msg=k)
    for k in sorted(set(biases) - set(depth2)):
        steps = (weights[k] - start[k]) / cfg.alf_gamma  # two ALF updates of -1, 0 or +1 gamma each
        assert np.abs(steps - np.round(steps)).max() < 1e-3 and np.abs(steps).max() >= 1, (k, steps)
        if model == "domains":
            assert np.array_equal(weights[k][8:], start[k][8:])  # the added domain's experts are left alone


def test_adamw_equals_mlx_adamw_with_clipping_and_schedule():
    """Same gradients in, same weights out over several steps: the norm above and below the clip, weight decay,
    warmup then cosine."""
    import mlx.nn as nn

    from dh_mlx.torch.optim import AdamW
    cfg = TrainConfig(steps=6, warmup_steps=2, lr=1e-2, grad_clip=1.0, weight_decay=0.1)
    rng = np.random.default_rng(0)
    w0 = {"a": rng.normal(size=(5, 7)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    ours = nn.Module()
    ours.a, ours.b = mx.array(w0["a"]), mx.array(w0["b"])
    opt = make_optimizer(cfg, streams=None)
    theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in w0.items()}
    topt = AdamW(theirs.values(), cfg)
    for step, scale in enumerate([3.0, 0.01, 1.0, 1e-6, 10.0, 0.5]):  # clipped, unclipped, tiny (eps matters)
        g = {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in w0.items()}
        norm = opt.clip_and_update(ours, {k: mx.array(v) for k, v in g.items()}, cfg.grad_clip)
        for k, p in theirs.items():
            p.grad = torch.tensor(g[k])
        assert topt.step().item() == pytest.approx(norm.item(), rel=1e-6)
        for k, p in theirs.items():
            np.testing.assert_allclose(p.detach().numpy(), np.array(getattr(ours, k)), rtol=0, atol=1e-6,
                                       err_msg=f"step {step}, {k}")
    assert np.abs(theirs["a"].detach().numpy() - w0["a"]).max() > 1e-2


@pytest.mark.parametrize("steps, warmup", [(40, 5), (7, 0), (3, 10), (100, 1)])
def test_learning_rate_schedule_equals_mlx(steps, warmup):
    from dh_mlx.torch.optim import learning_rate
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=3e-3, min_lr_ratio=0.1)
    schedule = make_optimizer(cfg, streams=None)._schedulers["learning_rate"]
    want = [schedule(mx.array(s, mx.uint64)).item() for s in range(steps + 5)]
    got = [learning_rate(cfg, s) for s in range(steps + 5)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(set(np.round(got, 9))) > min(steps, 3)  # it changes from step to step


def test_both_trainers_read_one_training_config_type(monkeypatch):
    """One TrainConfig: the twin's step, optimizer and trainer take dh-mlx train's, and the twin trainer's command
    line builds it with its defaults, its flags under dh-mlx train's names."""
    import dh_mlx.torch as twin
    from dh_mlx.torch import optim, step, train
    assert twin.TrainConfig is step.TrainConfig is optim.TrainConfig is train.TrainConfig is TrainConfig
    seen = []
    monkeypatch.setattr(train, "train", lambda **kw: seen.append(kw["train_config"]))
    train.main(["--data", "d", "--out", "o"])
    train.main(["--data", "d", "--out", "o", "--grad-accum", "3", "--lr", "0.01", "--warmup", "7"])
    assert seen == [TrainConfig(), TrainConfig(grad_accum=3, lr=0.01, warmup_steps=7)]


def test_the_twin_refuses_what_it_does_not_train():
    import dh_mlx.torch as twin
    model = twin.random_model(make_config(), seed=0)
    with pytest.raises(ValueError, match="mtp_distill"):
        twin.make_optimizer(model, TrainConfig(mtp_distill=True))


def test_the_twin_trainer_trains_as_dh_mlx_train(tmp_path, data):
    """`python -m dh_mlx.torch.train`'s loop and `dh-mlx train`'s, from the same model directory on the same JSONL
    with the same TrainConfig (micro-batches accumulated, domain dropout, warmup, clipping): the same terms at every
    step and the same model at the end."""
    import shutil

    import dh_mlx.torch as twin
    from dh_mlx.torch.train import train as twin_train
    from dh_mlx.train.run import train as mlx_train
    d, _ = data
    init = checkpoint(tmp_path / "init", "domains", 400)
    for f in (d / "tok").iterdir():
        shutil.copyfile(f, init / f.name)
    cfg = TrainConfig(**{**CFG, "steps": 3, "warmup_steps": 2, "grad_accum": 2, "domain_dropout": 0.5,
                         "eval_every": 100})
    ours = mlx_train(init=init, data=d / "data.jsonl", tokenizer=init, out=tmp_path / "mlx", progress=False,
                     **cfg.to_dict()).history
    theirs = twin_train(data=d / "data.jsonl", out=tmp_path / "twin", init=init, train_config=cfg)
    assert len(ours) == len(theirs) == 3
    for want, got in zip(ours, theirs):
        for k in TERMS:
            assert abs(got[k] - want[k]) <= 1e-5, (want["step"], k, got[k], want[k])
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-6)
    a = twin.load_model(tmp_path / "mlx", device="cpu", dtype=torch.float32).state_dict()
    b = twin.load_model(tmp_path / "twin", device="cpu", dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-5, k
