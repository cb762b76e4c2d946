"""The batched engine: a sequence's tokens and logits are the same alone or among others (each with its own
options, seed and domain), prompts join and leave the running batch, prefixes are reused, stop strings cut
cleanly, and one failing request leaves the others going."""

import threading

import numpy as np
import pytest

from dh_mlx import random_model
from dh_mlx.generation import generate_tokens
from dh_mlx.generation.engine import Engine, QueueFull, Request
from dh_mlx.generation.options import SamplingOptions
from dh_mlx.generation.text import TextOut
from helpers import make_config, randomise_for_parity


class Tok:
    """The least a tokenizer needs for the engine: ids are their own text."""
    vocab_size, eos_ids, eos_id, bos_id = 97, (96,), 96, None

    def stream_decoder(self):
        class D:
            def add(self, t):
                return f"<{t}>"

            def flush(self):
                return ""
        return D()

    def token_bytes(self):
        return [f"<{t}>".encode() for t in range(97)]


DOMAINS = {"domains": ["code", "math", "legal"], "experts_per_domain": 3}


@pytest.fixture(scope="module")
def model():
    config = make_config(max_position_embeddings=1024, n_routed_experts=12, n_group=4, topk_group=2,
                         domain_routing=DOMAINS)
    return randomise_for_parity(random_model(config, seed=3), 3)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 96, int(rng.integers(2, 60))).tolist() for _ in range(n)]


def run_all(engine: Engine, requests: list[Request]) -> list[list]:
    """Submit every request at once and step the engine until all are done; each request's events."""
    handles = [engine.submit(r) for r in requests]
    while not engine.idle():
        engine.step()
    return [list(h.events.queue) for h in handles]


def tokens_of(events) -> list[int]:
    return [t for e in events for t in e.tokens]


@pytest.mark.slow
def test_batched_greedy_equals_each_sequence_alone(model):
    ps = prompts(16)
    engine = Engine(model, Tok(), max_batch=16, prefill_chunk=16)
    together = run_all(engine, [Request(p, max_tokens=12, logprobs=3) for p in ps])
    for p, events in zip(ps, together):
        alone = run_all(Engine(model, Tok()), [Request(p, max_tokens=12, logprobs=3)])[0]
        assert tokens_of(events) == tokens_of(alone) == list(generate_tokens(model, p, max_tokens=12, mtp=False,
                                                                              eos_ids=(96,), sampling=SamplingOptions(vocab_limit=97)))[:12]
        got = np.array([[lp, *[a for _, a in alts]] for e in events if e.logprobs for _, lp, alts in e.logprobs])
        want = np.array([[lp, *[a for _, a in alts]] for e in alone if e.logprobs for _, lp, alts in e.logprobs])
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert events[-1].finish_reason in ("length", "stop") and events[-1].usage.prompt_tokens == len(ps[-1])


def test_each_row_keeps_its_own_options_seed_and_domain(model):
    ps = prompts(6, seed=1)
    options = [SamplingOptions(temp=0.8, top_k=20), SamplingOptions(), SamplingOptions(temp=1.2, top_p=0.9),
               SamplingOptions(repetition_penalty=1.5), SamplingOptions(temp=0.7, presence_penalty=1.0,
                                                                        frequency_penalty=0.5),
               SamplingOptions(min_p=0.1, temp=1.0)]
    make = lambda i: Request(ps[i], max_tokens=10, sampling=options[i].replace(seed=100 + i), domain=[0, None, 2, 1, None, 0][i])  # noqa: E731
    together = run_all(Engine(model, Tok(), max_batch=8), [make(i) for i in range(6)])
    for i in range(6):
        alone = run_all(Engine(model, Tok()), [make(i)])[0]
        assert tokens_of(together[i]) == tokens_of(alone), i
    code = run_all(Engine(model, Tok()), [Request(ps[0], max_tokens=10, domain=0)])[0]
    legal = run_all(Engine(model, Tok()), [Request(ps[0], max_tokens=10, domain=2)])[0]
    assert tokens_of(code) != tokens_of(legal)  # the domain routes the row


def test_requests_join_a_running_batch_and_long_prompts_prefill_in_chunks(model):
    engine = Engine(model, Tok(), max_batch=4, prefill_chunk=8)
    first = engine.submit(Request(prompts(1, 5)[0], max_tokens=30))
    for _ in range(6):
        engine.step()
    assert len(engine.rows) == 1
    long = [int(t) for t in np.random.default_rng(9).integers(0, 96, 200)]
    second = engine.submit(Request(long, max_tokens=5))
    decoded = []
    while not engine.idle():
        before = first.events.qsize()
        engine.step()
        decoded.append(first.events.qsize() - before)
    assert sum(decoded[:10]) >= 9  # the first kept decoding while the long prompt went in, a chunk a step
    assert tokens_of(list(second.events.queue)) == list(generate_tokens(model, long, max_tokens=5, mtp=False,
                                                                         eos_ids=(96,), sampling=SamplingOptions(vocab_limit=97)))[:5]


def test_a_repeated_prefix_is_not_prefilled_again(model):
    engine = Engine(model, Tok(), prefill_chunk=16)
    system = prompts(1, 7)[0] + [5] * 40
    a = run_all(engine, [Request(system + [1, 2, 3], max_tokens=4)])[0]
    b = run_all(engine, [Request(system + [9, 8], max_tokens=4)])[0]
    assert a[-1].usage.cached_tokens == 0 and b[-1].usage.cached_tokens == len(system)
    assert tokens_of(b) == tokens_of(run_all(Engine(model, Tok()), [Request(system + [9, 8], max_tokens=4)])[0])
    turn = system + [1, 2, 3] + tokens_of(a)[:-1]
    c = run_all(engine, [Request(turn + [4], max_tokens=2)])[0]
    assert c[-1].usage.cached_tokens == len(turn)  # a conversation's earlier turns and reply


def test_stop_strings_cut_before_the_stop_and_never_inside_a_character():
    class Chars:
        def __init__(self):
            self.text = iter(["Hé", "llo", " wo", "rld", "!"])

        def add(self, _):
            return next(self.text)

        def flush(self):
            return ""
    out, stopped, pieces = TextOut(Chars(), ("o wor",)), False, []
    for t in range(5):
        piece, stopped = out.add(t)
        pieces.append(piece)
        if stopped:
            break
    assert pieces == ["Hé", "ll", "", ""] and stopped  # "o", then "o wo", held: they could begin the stop
    assert TextOut(Chars(), ("zzz",)).add(0) == ("Hé", False)


def test_cancel_frees_the_row_and_a_full_queue_is_refused(model):
    engine = Engine(model, Tok(), max_batch=1, max_queue=1)
    first = engine.submit(Request(prompts(1)[0], max_tokens=100))
    engine.step()
    engine.submit(Request(prompts(1)[0], max_tokens=1))
    with pytest.raises(QueueFull):
        engine.submit(Request(prompts(1)[0], max_tokens=1))
    first.cancel()
    engine.step()
    assert list(first.events.queue)[-1].finish_reason == "cancelled" and engine.rows == [] or \
        engine.rows[0].handle is not first


def test_one_failing_request_leaves_the_others_going(model, monkeypatch):
    engine = Engine(model, Tok(), max_batch=4)
    start = engine._start

    def fail_on_seed(job):
        if job.request.sampling.seed == 13:
            raise RuntimeError("boom")
        start(job)
    monkeypatch.setattr(engine, "_start", fail_on_seed)
    out = run_all(engine, [Request(prompts(1)[0], max_tokens=5), Request(prompts(1)[0], max_tokens=5, sampling=SamplingOptions(seed=13)),
                           Request(prompts(1, 2)[0], max_tokens=5)])
    assert out[1][-1].finish_reason == "error" and "boom" in out[1][-1].error
    assert [e[-1].finish_reason for e in (out[0], out[2])] == ["length", "length"]


def test_the_engine_thread_serves_submissions_until_stopped(model):
    """In a thread of its own (MLX's streams are per thread: a long prompt's attention splits over two)."""
    engine = Engine(model, Tok())
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    long = [int(t) for t in np.random.default_rng(1).integers(0, 96, 400)]
    events = list(engine.submit(Request(long, max_tokens=3)))
    assert events[-1].finish_reason == "length", events[-1].error
    engine.stop()
    loop.join(10)
    assert not loop.is_alive() and events[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("kind", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_models_batch_like_they_run_alone(kind):
    """The indexer's key cache is carried (and padded) with the latents: V3.2 / GLM-5 rows decode batched with
    the tokens and logits they have alone, past index_topk positions."""
    extra = dict(model_type=kind, index_topk=5, index_head_dim=16, index_n_heads=16,
                 max_position_embeddings=1024)
    if kind == "glm_moe_dsa":
        extra.update(rope_interleave=True)
    try:
        config = make_config(**extra)
    except (TypeError, ValueError) as e:
        pytest.skip(f"{kind}: {e}")
    model = randomise_for_parity(random_model(config, seed=4), 4)
    ps = prompts(5, seed=3)
    together = run_all(Engine(model, Tok(), max_batch=8, prefill_chunk=8),
                       [Request(p, max_tokens=10, logprobs=2) for p in ps])
    for p, events in zip(ps, together):
        alone = run_all(Engine(model, Tok()), [Request(p, max_tokens=10, logprobs=2)])[0]
        assert tokens_of(events) == tokens_of(alone)
        got = np.array([lp for e in events if e.logprobs for _, lp, _ in e.logprobs])
        want = np.array([lp for e in alone if e.logprobs for _, lp, _ in e.logprobs])
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_events_that_come_before_a_listener_reach_it_in_order(model):
    engine = Engine(model, Tok())
    handle = engine.submit(Request(prompts(1)[0], max_tokens=4))
    while not engine.idle():
        engine.step()
    got = []
    handle.listen(got.append)  # (an HTTP handler starts listening after a fast request may have ended)
    assert [e.finish_reason for e in got][-1] == "length" and sum(len(e.tokens) for e in got) == 4


def test_rows_joining_one_by_one_keep_the_capacity_to_the_chunks_they_need():
    """16 prefilled prompts of 140..155 tokens join one after another: every join that grows the padding reuses
    the slack past the write position, so the batch stays one 256-position chunk (each chunk adds a trace and
    attention work for every row), and every row's positions are its own prompt's."""
    import mlx.core as mx

    from dh_mlx.generation.batch import BatchCache
    from dh_mlx.generation.cache import LatentCache

    batch, rows = BatchCache(2), []
    for b in range(16):
        caches = []
        for layer in range(2):
            c = LatentCache()
            T = 140 + b
            c.update_and_fetch(mx.random.normal((1, 1, T, 8), key=mx.random.key(10 * b + layer)),
                               mx.random.normal((1, 1, T, 4), key=mx.random.key(99 + 10 * b + layer)))
            caches.append(c)
        rows.append(caches)
        batch.add(caches)
    assert batch.capacity == 256 and batch.write == 155
    for b, caches in enumerate(rows):
        for got, want in zip(batch.row(b), caches):
            assert got.offset == want.offset == 140 + b
            assert mx.array_equal(got.latent, want.state[0]).item() and mx.array_equal(got.k_pe, want.state[1]).item()


def test_generate_tokens_is_a_batch_of_one_through_the_engine(model, monkeypatch):
    """One decode loop: generate_tokens (plain, and MTP drafting as a row decoding alone) runs the engine's
    steps, and its tokens are the engine's for the same request."""
    from dh_mlx.generation import engine as engine_module
    steps = []
    real_step = engine_module.Engine.step
    monkeypatch.setattr(engine_module.Engine, "step", lambda self: (steps.append(len(self.rows)), real_step(self))[1])
    p = prompts(1, seed=5)[0]
    plain = list(generate_tokens(model, p, max_tokens=10, mtp=False, eos_ids=(96,),
                                 sampling=SamplingOptions(vocab_limit=97)))
    assert len(steps) >= 9 and max(steps) == 1  # one batched row (the first token comes with the prefill)
    served = run_all(Engine(model, Tok()), [Request(p, max_tokens=10)])[0]
    assert plain == tokens_of(served)[:10]
    steps.clear()
    drafted = list(generate_tokens(model, p, max_tokens=10, mtp=True, eos_ids=(96,),
                                   sampling=SamplingOptions(vocab_limit=97)))
    assert drafted == plain and len(steps) >= 10 and max(steps) == 0  # alone: no batched row


def test_a_model_whose_caches_do_not_batch_is_served_one_request_at_a_time(tmp_path):
    """DeepSeek-V4's caches (sliding window, compressors) do not batch: its requests queue and each decodes
    alone, with the tokens of greedy decoding by the full forward pass."""
    pytest.importorskip("transformers")
    import mlx.core as mx

    from dh_mlx import load_model
    from v4_release import build, prompt
    v4 = load_model(build(tmp_path, "flash_like"), dtype="float32")

    class V4Tok(Tok):
        vocab_size, eos_ids = v4.config.vocab_size, ()

    engine = Engine(v4, V4Tok(), max_batch=4)
    ps = [prompt(9 + 3 * i, batch=1, seed=i)[0].tolist() for i in range(3)]
    handles = [engine.submit(Request(p, max_tokens=4)) for p in ps]
    while not engine.idle():
        assert engine.running <= 1 and not engine.rows
        engine.step()
    for p, h in zip(ps, handles):
        seq = list(p)
        for _ in range(4):
            seq.append(int(np.argmax(np.array(v4(mx.array([seq])))[0, -1])))
        assert tokens_of(list(h.events.queue)) == seq[len(p):]


def test_logprobs_and_grammars_are_refused_by_name_for_a_row_that_decodes_alone(model):
    from dh_mlx.generation.requests import RequestError
    engine = Engine(model, Tok())
    with pytest.raises(RequestError, match="^logprobs: needs a batched row") as e:
        engine.submit(Request([1, 2, 3], max_tokens=2, logprobs=2, mtp=True))
    assert e.value.param == "logprobs"
    assert engine.idle()
