"""Generation: samplers, chunked prefill, prompt-cache reuse, MTP speculative identity, context limits."""

import mlx.core as mx
import numpy as np
import pytest

from dh_mlx import random_model
from dh_mlx.generation import GenerationStats, generate_tokens
from dh_mlx.generation.cache import make_cache
from dh_mlx.generation.options import SamplingOptions
from dh_mlx.generation.sample import apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p
from dh_mlx.generation.speculative import DraftPolicy
from dh_mlx.generation.steps import PromptCache, compiled_cached_step, compiled_decode_step, decode_step, prefill
from helpers import make_config, randomise_for_parity, tokens


@pytest.fixture(scope="module")
def model():
    return randomise_for_parity(random_model(make_config(max_position_embeddings=64), seed=1), 1)


def test_temperature_zero_is_argmax():
    logits = mx.array([[0.1, 3.0, -1.0, 2.9]])
    assert SamplingOptions().draw(logits).item() == 1


def test_top_k_top_p_min_p_masks():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda x: (np.array(x)[0] > -np.inf).tolist()  # noqa: E731
    assert keep(apply_top_k(logits, 2)) == [True, True, False, False]
    assert keep(apply_top_p(logits, 0.8)) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert keep(apply_top_p(logits, 0.81)) == [True, True, True, False]
    assert keep(apply_min_p(logits, 0.2)) == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    p = np.array(SamplingOptions(temp=1.0, top_k=2).distribution(logits))[0]
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0], rtol=1e-5)


def test_repetition_penalty():
    logits = mx.array([[2.0, -2.0, 1.0]])
    out = np.array(apply_repetition_penalty(logits, mx.array([0, 1]), 2.0))[0]
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_sampling_follows_the_distribution():
    mx.random.seed(0)
    logits = mx.log(mx.array([[0.6, 0.3, 0.1]]))
    draws = np.array(SamplingOptions(temp=1.0).draw(mx.broadcast_to(logits, (20000, 3))))
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 20000, [0.6, 0.3, 0.1], atol=0.015)


def test_chunked_prefill_equals_one_shot(model):
    ids = mx.array(tokens(40, batch=1))
    a_cache, b_cache = make_cache(model.config), make_cache(model.config)
    a, _ = prefill(model, ids, a_cache, step_size=512)
    b, _ = prefill(model, ids, b_cache, step_size=7)
    assert mx.abs(a - b).max().item() <= 1e-4
    for x, y in zip(a_cache, b_cache):
        assert mx.abs(x.state[0] - y.state[0]).max().item() <= 1e-5
    full = model(ids)[:, -1]
    assert mx.abs(a - full).max().item() <= 1e-4


def test_compiled_decode_step_equals_eager_across_a_capacity_chunk():
    """The compiled step writes at an array offset into the whole capacity and masks the rest; it must give
    the eager step's logits, also when the cache grows by a chunk (position 256) in the middle."""
    model = randomise_for_parity(random_model(make_config(), seed=2), 2)
    eager, compiled = make_cache(model.config), make_cache(model.config)
    prompt = mx.array(tokens(250, model.config.vocab_size, seed=3, batch=1))
    mx.eval(prefill(model, prompt, eager), prefill(model, prompt, compiled))
    step = compiled_decode_step(model, domain=2)
    token = mx.array([[5]])
    for _ in range(10):
        want, want_h = decode_step(model, token, eager, domain=2)
        got, got_h = step(token, compiled)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
        np.testing.assert_allclose(np.array(got_h), np.array(want_h), atol=1e-5)
        token = mx.argmax(want, axis=-1)[:, None]
    assert compiled[0].offset == eager[0].offset == 260 and compiled[0].latent.shape[2] == 512
    prompt_ids = tokens(20, model.config.vocab_size, seed=4, batch=1)[0].tolist()
    sampled = SamplingOptions(temp=0.8, seed=7)
    compiled_tokens = list(generate_tokens(model, prompt_ids, max_tokens=12, sampling=sampled, mtp=False))
    model.fixed_capacity_steps = False  # the eager decode_step (as a pipeline rank decodes)
    try:
        assert compiled_tokens == list(generate_tokens(model, prompt_ids, max_tokens=12, sampling=sampled, mtp=False))
    finally:
        del model.fixed_capacity_steps


def test_compiled_two_token_step_with_rollback_equals_eager():
    """MTP's verify: two new positions per compiled call, the second sometimes rolled back (trim) and then
    overwritten; logits and hidden states must equal the eager forward's, across a capacity chunk."""
    model = randomise_for_parity(random_model(make_config(), seed=2), 2)
    eager, compiled = make_cache(model.config), make_cache(model.config)
    prompt = mx.array(tokens(251, model.config.vocab_size, seed=3, batch=1))
    mx.eval(prefill(model, prompt, eager), prefill(model, prompt, compiled))
    step = compiled_cached_step(lambda t, views, mask: model.forward(t, views, mask=mask))
    pair = mx.array([[5, 9]])
    for i in range(6):
        want = model.forward(pair, eager)
        got_logits, got_hidden = step(pair, compiled)
        np.testing.assert_allclose(np.array(got_logits), np.array(want.logits), atol=1e-5)
        np.testing.assert_allclose(np.array(got_hidden), np.array(want.hidden), atol=1e-5)
        if i % 2:  # reject the second position
            for c in eager + compiled:
                c.trim(1)
        pair = mx.argmax(want.logits, axis=-1).astype(mx.int32)
    assert compiled[0].offset == eager[0].offset == 251 + 9 and compiled[0].latent.shape[2] == 512


def test_prompt_cache_reuse_gives_the_same_tokens(model):
    prompt = tokens(20, batch=1)[0].tolist()
    fresh = list(generate_tokens(model, prompt, max_tokens=8, mtp=False))
    pc = PromptCache.new(model)
    first = list(generate_tokens(model, prompt[:12], max_tokens=4, mtp=False, prompt_cache=pc))
    assert len(first) == 4
    reused = list(generate_tokens(model, prompt, max_tokens=8, mtp=False, prompt_cache=pc))
    assert reused == fresh
    assert pc.cache[0].offset == len(prompt) + 7


def test_mtp_speculative_greedy_is_identical(model):
    prompt = tokens(10, batch=1)[0].tolist()
    plain = list(generate_tokens(model, prompt, max_tokens=25, mtp=False))
    stats = GenerationStats()
    spec = list(generate_tokens(model, prompt, max_tokens=25, mtp=True, stats=stats))
    assert spec == plain
    assert stats.drafted > 0


def test_mtp_greedy_accepts_good_drafts_and_stays_identical(model, monkeypatch):
    """An oracle draft head (the token that followed `next_token` in the plain greedy output, at its first
    occurrence) is right most of the time: accepted drafts must give the same tokens, faster in steps."""
    prompt = tokens(6, batch=1)[0].tolist()
    plain = list(generate_tokens(model, prompt, max_tokens=20, mtp=False))
    seq = prompt + plain
    table = np.zeros(model.config.vocab_size, np.int64)
    for a, b in reversed(list(zip(seq, seq[1:]))):
        table[a] = b
    table = mx.array(table)
    real = model.mtp_forward

    def oracle(hidden, next_tokens, *args, **kwargs):
        out = real(hidden, next_tokens, *args, **kwargs)
        V = out.logits.shape[-1]
        return out._replace(logits=10.0 * (mx.arange(V) == table[next_tokens][..., None]).astype(out.logits.dtype))

    monkeypatch.setattr(model, "mtp_forward", oracle)
    stats, policy = GenerationStats(), DraftPolicy(adaptive=False)
    timings = []
    record = policy.record
    monkeypatch.setattr(policy, "record", lambda kind, seconds, accepted=None: (timings.append(seconds),
                                                                                   record(kind, seconds, accepted)))
    spec = list(generate_tokens(model, prompt, max_tokens=20, mtp=policy, stats=stats))
    assert spec == plain
    assert stats.accepted >= stats.drafted // 2 and stats.drafted < len(plain)
    # the draft step's first call with 1 and with 2 MTP positions compiles it: not timed, the rest are
    assert timings.count(None) == 2 and len(timings) == stats.drafted
    kept = [t for i, t in enumerate(timings) if i >= DraftPolicy.WARMUP and t is not None]
    assert list(policy.times["draft"]) == kept[-len(policy.times["draft"]):] and len(kept) > 0


def test_mtp_rejections_roll_the_cache_back(model):
    """A draft head that always proposes token 0 is mostly rejected; output and cache must stay exact."""
    prompt = tokens(6, batch=1)[0].tolist()
    plain = list(generate_tokens(model, prompt, max_tokens=12, mtp=False))
    layer = model.model.mtp_layers[0]
    saved = layer.shared_head.head.weight
    try:
        layer.shared_head.head.weight = mx.zeros_like(saved)  # uniform draft logits: argmax is token 0
        stats, pc = GenerationStats(), PromptCache.new(model)
        out = list(generate_tokens(model, prompt, max_tokens=12, mtp=True, stats=stats, prompt_cache=pc))
    finally:
        layer.shared_head.head.weight = saved
    assert out == plain
    assert stats.accepted < stats.drafted
    if 0 not in plain[1:]:
        assert stats.accepted == 0
    assert pc.cache[0].offset == len(prompt) + len(out) - 1 and pc.tokens == (prompt + out)[:-1]


@pytest.mark.slow
def test_mtp_sampling_keeps_the_target_distribution():
    """Speculative sampling with any draft must reproduce the main model's next-token distribution."""
    m = random_model(make_config(vocab_size=5, max_position_embeddings=64), seed=2)
    prompt = [1, 2, 3]
    target = np.array(mx.softmax(m(mx.array([prompt]))[0, -1] / 1.0))
    # The second token is the first one that depends on the draft's acceptance.
    counts = {}
    mx.random.seed(0)
    for _ in range(300):
        out = list(generate_tokens(m, prompt, max_tokens=2, sampling=SamplingOptions(temp=1.0), mtp=True))
        counts.setdefault(out[0], []).append(out[1])
    first = np.bincount([k for k, v in counts.items() for _ in v], minlength=5) / 300
    np.testing.assert_allclose(first, target, atol=0.09)
    k = max(counts, key=lambda x: len(counts[x]))
    second_target = np.array(mx.softmax(m(mx.array([prompt + [k]]))[0, -1]))
    second = np.bincount(counts[k], minlength=5) / len(counts[k])
    np.testing.assert_allclose(second, second_target, atol=0.15)


def test_prompt_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        list(generate_tokens(model, list(range(60)), max_tokens=10))


def test_mtp_with_a_one_token_prompt(model):
    assert list(generate_tokens(model, [5], max_tokens=6, mtp=True)) == list(generate_tokens(model, [5], max_tokens=6,
                                                                                             mtp=False))


def test_draft_policy_drafts_only_while_it_pays():
    from dh_mlx.generation.speculative import DraftPolicy

    def run(policy, t_draft, t_plain, accept, steps):
        modes = []
        for i in range(steps):
            modes.append(policy.mode)
            if policy.mode == "draft":
                policy.record("draft", t_draft, accept(i))
            else:
                policy.record("plain", t_plain)
        return "".join(m[0] for m in modes)

    # A draft step costs 1.5 plain steps: break-even acceptance 0.5.
    good = DraftPolicy(probe=4, pause=8)
    modes = run(good, 1.5, 1.0, lambda i: i % 4 != 0, 60)  # 75 % accepted: keeps drafting after timing
    assert good.break_even() == pytest.approx(0.5)
    assert modes[:4] == "dddd" and modes[4:10] == "pppppp" and set(modes[10:]) == {"d"}
    bad = DraftPolicy(probe=4, pause=8, max_pause=32)
    modes = run(bad, 1.5, 1.0, lambda i: i % 4 == 0, 120)  # 25 % accepted: pauses, doubling, and probes
    assert modes[10:18] == "p" * 8 and modes[18:22] == "dddd" and modes[22:38] == "p" * 16
    assert modes[38:42] == "dddd" and modes[42:74] == "p" * 32 and modes[74:78] == "dddd"
    hopeless = DraftPolicy(probe=4, pause=8, max_pause=64)  # 2.1x: even 100 % acceptance cannot pay
    modes = run(hopeless, 2.1, 1.0, lambda i: True, 100)
    assert modes[10:74] == "p" * 64 and modes[74:78] == "dddd"
    fixed = DraftPolicy(adaptive=False)
    assert set(run(fixed, 3.0, 1.0, lambda i: False, 30)) == {"d"}
    with pytest.raises(ValueError, match="probe"):
        DraftPolicy(probe=0)


def test_mtp_cache_catches_up_after_plain_steps(model):
    """Scripted draft/plain steps: output equals plain greedy and the MTP cache equals an eager MTP pass."""
    from dh_mlx.generation.cache import LatentCache
    from dh_mlx.generation.speculative import DraftPolicy

    class Scripted(DraftPolicy):
        def __init__(self, script):
            super().__init__()
            self.script, self.i, self.mode = script, 0, script[0]

        def record(self, kind, seconds, accepted=None):
            assert kind == self.mode
            self.i += 1
            self.mode = self.script[min(self.i, len(self.script) - 1)]

    prompt = tokens(7, batch=1)[0].tolist()
    plain = list(generate_tokens(model, prompt, max_tokens=24, mtp=False))
    script = ["draft", "draft", "plain", "plain", "plain", "draft", "plain", "draft", "draft"] + ["plain"] * 4
    stats, pc = GenerationStats(), PromptCache.new(model)
    out = list(generate_tokens(model, prompt, max_tokens=24, stats=stats, prompt_cache=pc,
                               mtp=Scripted([m for m in script] + ["draft"] * 30)))
    assert out == plain
    assert stats.drafted >= 5
    seq = mx.array([prompt + out])
    n = pc.mtp_cache.offset
    assert n >= len(prompt) + 10
    h, _ = model.model(seq[:, :n])  # (1, n, D): no cache, one pass
    ref = LatentCache()
    model.mtp_forward(h, seq[:, 1:n + 1], cache=ref)
    np.testing.assert_allclose(np.array(pc.mtp_cache.latent[:, :, :n]), np.array(ref.latent[:, :, :n]),
                               atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.array(pc.mtp_cache.k_pe[:, :, :n]), np.array(ref.k_pe[:, :, :n]),
                               atol=2e-5, rtol=1e-4)


def test_stopping_at_eos_leaves_a_consistent_prompt_cache(model):
    """The next step is queued before the current token is read back, so the EOS token is fed to the cache:
    the recorded tokens must say so, and a reusing call must continue exactly like a fresh one."""
    prompt = tokens(10, batch=1)[0].tolist()
    free = list(generate_tokens(model, prompt, max_tokens=6, mtp=False))
    eos = free[2]
    pc = PromptCache.new(model)
    out = list(generate_tokens(model, prompt, max_tokens=6, mtp=False, eos_ids=(eos,), prompt_cache=pc))
    assert out == free[: free.index(eos) + 1]
    assert pc.tokens == (prompt + out)[: pc.cache[0].offset] and pc.cache[0].offset >= len(prompt) + len(out) - 1
    longer = prompt + out + [7, 9]
    assert list(generate_tokens(model, longer, max_tokens=4, mtp=False, prompt_cache=pc)) == list(
        generate_tokens(model, longer, max_tokens=4, mtp=False))


PENALTY = SamplingOptions(repetition_penalty=3.0, repetition_context=8)


def penalised_greedy_loop(model, prompt, n=12, penalty=3.0, context=8):
    """Greedy decoding one eager step at a time, each step's logits penalised by the last `context` tokens."""
    cache, history = make_cache(model.config), list(prompt)
    logits, _ = prefill(model, mx.array([prompt]), cache)
    out = []
    for _ in range(n):
        t = mx.argmax(apply_repetition_penalty(logits, mx.array(history[-context:]), penalty), axis=-1).item()
        out.append(t)
        history.append(t)
        logits, _ = decode_step(model, mx.array([[t]]), cache)
    return out


def test_repetition_penalty_in_generation_equals_a_step_by_step_loop(model):
    """The penalised window is kept on the device (the next step is queued before the token is read back)."""
    changed = 0
    for n in (5, 9, 14):
        prompt = tokens(n, batch=1)[0].tolist()
        got = list(generate_tokens(model, prompt, max_tokens=12, mtp=False, sampling=PENALTY))
        assert got == penalised_greedy_loop(model, prompt)
        changed += got != list(generate_tokens(model, prompt, max_tokens=12, mtp=False))
    assert changed  # the penalty changed at least one generation


def test_mtp_is_on_by_default_when_the_model_has_a_module(model):
    """As `dh-mlx generate` does: the library's default drafts with the MTP module (same greedy tokens)."""
    prompt = tokens(10, batch=1)[0].tolist()
    stats = GenerationStats()
    assert list(generate_tokens(model, prompt, max_tokens=10, stats=stats)) == list(
        generate_tokens(model, prompt, max_tokens=10, mtp=False))
    assert stats.drafted > 0 and stats.draft_summary


@pytest.mark.parametrize("n", [5, 9, 14])
def test_mtp_with_a_repetition_penalty_equals_the_step_by_step_loop(model, n):
    """Drafting every step with the penalty on: the draft, the verified position and the bonus position are
    each penalised by the tokens before them, so the output is the plain penalised greedy loop's."""
    prompt = tokens(n, batch=1)[0].tolist()
    stats = GenerationStats()
    got = list(generate_tokens(model, prompt, max_tokens=12, sampling=PENALTY, mtp=DraftPolicy(adaptive=False),
                               stats=stats))
    assert got == penalised_greedy_loop(model, prompt)
    assert stats.drafted >= 5



def test_mtp_reuses_the_prompt_cache_across_calls(model):
    """A second MTP call whose prompt extends the first's prefills only the new tokens (both caches keep the
    common prefix) and gives the tokens of a fresh call; a diverging plain call in between drops the MTP
    entries past the new common prefix."""
    prompt = tokens(30, batch=1)[0].tolist()
    fresh = list(generate_tokens(model, prompt, max_tokens=8, mtp=True))
    pc, stats = PromptCache.new(model), GenerationStats()
    list(generate_tokens(model, prompt[:20], max_tokens=4, mtp=True, prompt_cache=pc))
    assert pc.mtp_cache.offset >= 10
    assert list(generate_tokens(model, prompt, max_tokens=8, mtp=True, prompt_cache=pc, stats=stats)) == fresh
    assert stats.prompt_tokens <= len(prompt) - 10  # the reused prefix was not run again
    other = prompt[:6] + [(t + 1) % model.config.vocab_size for t in prompt[6:]]
    list(generate_tokens(model, other, max_tokens=3, mtp=False, prompt_cache=pc))
    assert pc.mtp_cache.offset <= 5
    assert list(generate_tokens(model, prompt, max_tokens=8, mtp=True, prompt_cache=pc)) == fresh


class ScriptedPolicy(DraftPolicy):
    """Drafts or not as the script says (then its last entry forever)."""

    def __init__(self, script):
        super().__init__()
        self.script, self.i, self.mode = script, 0, script[0]

    def record(self, kind, seconds, accepted=None):
        self.i += 1
        self.mode = self.script[min(self.i, len(self.script) - 1)]


def assert_mtp_cache_is_an_eager_pass(model, pc, seq):
    """The MTP cache's entries equal one eager MTP pass over the main model's hidden states of `seq`."""
    from dh_mlx.generation.cache import LatentCache
    n = pc.mtp_cache.offset
    h, _ = model.model(mx.array([seq[:n]]))
    ref = LatentCache()
    model.mtp_forward(h, mx.array([seq[1:n + 1]]), cache=ref)
    np.testing.assert_allclose(np.array(pc.mtp_cache.latent[:, :, :n]), np.array(ref.latent[:, :, :n]), atol=2e-5,
                               rtol=1e-4)


@pytest.mark.parametrize("script", [["draft", "plain"], ["plain"], ["draft"]])
def test_mtp_continuation_prefills_only_the_new_tokens(model, script):
    """However the last call ended (plain steps the MTP cache has not seen, or drafts), a call whose prompt
    extends everything cached prefills only the new tokens, as plain decoding does: the main model's hidden
    states of the positions the MTP cache lacks are kept for it. Tokens equal a fresh call's."""
    prompt = tokens(12, batch=1)[0].tolist()
    pc = PromptCache.new(model)
    out = list(generate_tokens(model, prompt, max_tokens=9, prompt_cache=pc,
                               mtp=ScriptedPolicy(script)))
    assert len(pc.tokens) == len(prompt) + 8 and pc.mtp_cache.offset + pc.mtp_hidden.shape[1] == len(pc.tokens)
    longer = prompt + out + [3, 5, 7]
    stats = GenerationStats()
    got = list(generate_tokens(model, longer, max_tokens=6, prompt_cache=pc, stats=stats,
                               mtp=ScriptedPolicy(["draft"])))
    assert stats.prompt_tokens == 4  # the last generated token (never fed) and the three new ones
    assert got == list(generate_tokens(model, longer, max_tokens=6, mtp=False))
    assert_mtp_cache_is_an_eager_pass(model, pc, longer + got)


@pytest.mark.parametrize("mtp", [False, True])
def test_a_consumer_stopping_early_leaves_a_consistent_prompt_cache(model, mtp):
    """A caller that stops reading (a stop string, a closed connection, Ctrl-C) leaves caches that hold exactly
    the recorded tokens: the next call continues like a fresh one."""
    prompt = tokens(10, batch=1)[0].tolist()
    pc = PromptCache.new(model)
    gen = generate_tokens(model, prompt, max_tokens=20, prompt_cache=pc,
                          mtp=ScriptedPolicy(["draft", "draft", "plain"]) if mtp else False)
    taken = [next(gen) for _ in range(5)]
    gen.close()
    assert pc.tokens == (prompt + taken)[: len(pc.tokens)] and pc.cache[0].offset == len(pc.tokens)
    longer = prompt + taken + [4]
    assert list(generate_tokens(model, longer, max_tokens=5, mtp=mtp, prompt_cache=pc)) == list(
        generate_tokens(model, longer, max_tokens=5, mtp=False))
