"""MTP self-speculative decoding: the MTP module drafts one token, the main model verifies it in one forward.

Per draft step the main model reads [last token, draft] (2 positions); the draft is kept with probability
min(1, p(d)/q(d)) (standard speculative sampling: greedy when temp = 0, where it reduces to "draft == argmax"),
so the output follows the main model's distribution exactly. A rejected draft's cache position is trimmed.

The loop composes three steps, each compilable alone: `draft` (the MTP module proposes the next token),
`verify` (the main model's compiled cached step over [token, draft]) and the accept rule (`accept_greedy`,
`accept_sampled`). The prompt goes through the plain `prefill`, which also fills the MTP cache.

Drafting costs a 2-position verify plus the MTP layer, so it pays only above a break-even acceptance that
depends on the model and the machine. `DraftPolicy` times both kinds of step in the run itself and switches
to plain one-token steps while drafting loses, probing again later; the MTP cache catches up over the plain
stretch in one forward. Which kind of step runs depends only on earlier steps, so every emitted token is
still the main model's (greedy identical, sampling exact), repetition penalty included: it adjusts the draft's,
the verified and the bonus position's logits with the tokens before each.
"""

from __future__ import annotations

import time
from collections import deque
from statistics import median
from typing import Iterator

import mlx.core as mx

from ..model import Model
from .cache import LatentCache, layer_cache
from .options import SamplingOptions
from .steps import compiled_cached_step, domain_array, prefill


class DraftPolicy:
    """Draft while acceptance > t_draft / t_plain - 1 (the break-even): t are this run's median wall times of a
    draft step (verify 2 positions, draft the next token) and a plain step (1 position); acceptance is over
    the last `window` drafts. Starts with `probe` drafts, then WARMUP + `probe` plain steps to time them;
    afterwards a losing draft mode pauses for `pause` plain steps, doubling per failed probe up to `max_pause`
    (at once when the break-even is above 1: then no acceptance can pay), and probes again. One policy can
    serve several calls (`generate_tokens(..., mtp=policy)`): what it measured carries over.
    """

    WARMUP = 2  # the first steps of each kind include tracing and compiling: not timed

    def __init__(self, probe: int = 4, pause: int = 16, max_pause: int = 256, window: int = 16,
                 adaptive: bool = True):
        if min(probe, pause, max_pause, window) < 1:
            raise ValueError("DraftPolicy: probe, pause, max_pause and window must be >= 1")
        self.adaptive = adaptive  # False: draft every step (what measuring the acceptance rate needs)
        self.probe, self.min_pause, self.max_pause = probe, pause, max_pause
        self.pause = pause
        self.outcomes: deque[bool] = deque(maxlen=window)
        self.times = {"draft": deque(maxlen=window), "plain": deque(maxlen=window)}
        self.seen = {"draft": 0, "plain": 0}
        self.mode, self.left, self.pausing = "draft", probe, False

    def break_even(self) -> float | None:
        """The acceptance rate above which drafting is faster, or None until both kinds of step are timed."""
        if not (self.times["draft"] and self.times["plain"]):
            return None
        return median(self.times["draft"]) / median(self.times["plain"]) - 1

    def summary(self) -> str:
        """What the measured step times say of drafting, in words; the break-even is a probability in [0, 1]."""
        need = self.break_even()
        if need is None:
            return "draft and plain steps not both timed yet"
        cost = f"a draft step took {1 + need:.2f} plain steps here"
        if need >= 1:
            return f"{cost}: drafting cannot pay at any acceptance, so it runs only to probe"
        if need <= 0:
            return f"{cost}: drafting pays at any acceptance"
        return f"{cost}: drafting pays above {need:.0%} acceptance, and runs only while it does"

    def record(self, kind: str, seconds: float | None, accepted: bool | None = None) -> None:
        """One finished step of `kind` ("draft" with its outcome, or "plain"), `seconds` None when the step
        was not a fair sample (it traced a new shape); then choose the next mode."""
        self.seen[kind] += 1
        if self.seen[kind] > self.WARMUP and seconds is not None:
            self.times[kind].append(seconds)
        if accepted is not None:
            self.outcomes.append(bool(accepted))
        self.left -= 1
        if self.left > 0 or not self.adaptive:
            return
        need = self.break_even()
        if self.mode == "plain" and self.pausing:  # a pause is over: probe again
            self.mode, self.left, self.pausing = "draft", self.probe, False
        elif not self.times["plain"]:
            self.mode, self.left = "plain", self.WARMUP + self.probe
        elif not self.times["draft"]:
            self.mode, self.left = "draft", self.probe
        elif sum(self.outcomes) > need * len(self.outcomes):
            self.mode, self.left, self.pause = "draft", self.probe, self.min_pause
        else:
            pause = self.pause if need < 1 else self.max_pause
            self.mode, self.left, self.pausing = "plain", pause, True
            self.pause = min(2 * pause, self.max_pause)


def recent(options: SamplingOptions, history: list[int], then: mx.array | None = None) -> mx.array | None:
    """The repetition penalty's window after `history` (and the lazy token `then`); None without a penalty."""
    if options.repetition_penalty == 1.0:
        return None
    n = options.repetition_context
    window = mx.array(history[-n:] if then is None else history[-(n - 1):] if n > 1 else [], mx.int32)
    return window if then is None else mx.concatenate([window, then.reshape(1).astype(mx.int32)])[-n:]


def _distribution(options: SamplingOptions, logits: mx.array, recent) -> mx.array:
    """(V,) the probabilities a token is drawn from (one-hot argmax when greedy)."""
    return options.distribution(options.penalized(logits[None], recent))[0]


def accept_greedy(options: SamplingOptions, draft: mx.array, logits: mx.array, recent0, recent1):
    """Greedy acceptance: keep the draft iff it is the main model's choice at the token's position.
    logits (2, V) at [token, draft] -> (accept, correction, bonus), all lazy."""
    correction = mx.argmax(options.penalized(logits[0], recent0))
    bonus = mx.argmax(options.penalized(logits[1], recent1))
    return draft == correction, correction, bonus


def accept_sampled(options: SamplingOptions, draft: mx.array, q: mx.array, logits: mx.array, recent0, recent1):
    """Speculative sampling: keep the draft with probability min(1, p(d) / q(d)); on rejection draw from the
    residual max(p - q, 0), so the output follows p exactly. -> (accept, correction, bonus), all lazy."""
    p0, p1 = _distribution(options, logits[0], recent0), _distribution(options, logits[1], recent1)
    ratio = p0[draft] / mx.maximum(q[draft], 1e-20)
    accept = (ratio >= 1.0) | (mx.random.uniform() < ratio)
    residual = mx.maximum(p0 - q, 0.0)
    bonus, correction = options.draw_from(p1), options.draw_from(residual / mx.maximum(residual.sum(), 1e-20))
    return accept, correction, bonus


class Drafter:
    """The MTP module's draft step over its own cache; compiled for one or two new positions (after a draft
    step, or after one plain step), eager over a longer stretch of plain steps."""

    def __init__(self, model: Model, domain: mx.array | None, cache: LatentCache | None = None):
        self.model, self.domain = model, domain
        self.cache = cache if cache is not None else layer_cache(model.config)
        self._step = compiled_cached_step(
            lambda tokens, views, mask, hidden: model.mtp_forward(hidden, tokens, 0, views[0], domain, mask),
            caches_of=lambda c: [c])

    def __call__(self, hidden: mx.array, tokens: mx.array) -> mx.array:
        """hidden (1, L, D) of the main model at the positions after the cache's last, tokens (1, L) that follow
        them -> the logits (1, V) of the token after the last."""
        if tokens.shape[1] <= 2:
            return self._step(tokens, self.cache, hidden)[0][:, -1]
        return self.model.mtp_forward(hidden, tokens, cache=self.cache, domain_ids=self.domain).logits[:, -1]


def mtp_generate(model: Model, pc, todo: list[int], *, stats, max_tokens: int, eos_ids=(),
                 prefill_step_size: int = 512, domain: int | None = None, options: SamplingOptions = SamplingOptions(),
                 policy: DraftPolicy | None = None) -> Iterator[int]:
    """Yield tokens like `generate_tokens`; `pc` is a PromptCache already trimmed to the reused prefix.

    `policy` decides per step whether to draft (default: a fresh `DraftPolicy`). The MTP cache is left in
    `pc.mtp_cache`: the positions whose MTP input has run (the main cache's but the last, less any plain steps
    at the end, whose input is only caught up when drafting resumes). A later call reuses the prefix that both
    caches hold and prefills the rest.
    """
    policy = policy if policy is not None else DraftPolicy()
    d = domain_array(domain)
    cache = pc.cache
    n_cached, pending = len(pc.tokens), pc.mtp_hidden
    if pc.mtp_cache is None or pending is None or pc.mtp_cache.offset + pending.shape[1] != n_cached:
        # No hidden states for the positions the MTP cache lacks: prefill them again. MTP entry t ran on
        # (hidden t, token t + 1): it is still right while both lie in the reused prefix.
        keep = 0 if pc.mtp_cache is None else max(min(pc.mtp_cache.offset, n_cached - 1), 0)
        if not all(getattr(c, "trimmable", True) for c in cache):  # (DeepSeek-V4's: start again)
            keep = 0
        for c in cache:
            c.trim(c.offset - keep)
        if pc.mtp_cache is not None:
            pc.mtp_cache.trim(pc.mtp_cache.offset - keep)
        todo = pc.tokens[keep:] + todo
        pc.tokens, pending = pc.tokens[:keep], None
    drafter = Drafter(model, d, pc.mtp_cache if pc.tokens else None)
    pc.mtp_cache, pc.mtp_hidden = drafter.cache, None
    if pending is not None and pending.shape[1]:  # the waiting MTP entries, now that their next tokens are known
        start = drafter.cache.offset
        model.mtp_forward(pending, mx.array([pc.tokens[start + 1:] + todo[:1]]), cache=drafter.cache,
                          domain_ids=d)
    verify = compiled_cached_step(lambda tokens, views, mask: model.forward(tokens, views, d, mask=mask))
    history = pc.tokens + list(todo)  # every token so far: the repetition penalty's windows

    def plain_step(tok: mx.array, recent) -> tuple[mx.array, mx.array]:  # -> (hidden (1, 1, D), next token)
        logits, hidden = verify(tok.reshape(1, 1), cache)
        return hidden, options.draw_from(_distribution(options, logits[0, 0], recent))

    tic = time.perf_counter()
    logits, h_last = prefill(model, mx.array([todo]), cache, step_size=prefill_step_size, domain=domain,
                             mtp_cache=drafter.cache)
    token = options.draw_from(_distribution(options, logits[0], recent(options, history))).item()
    T = len(todo)
    stats.prompt_tokens, stats.prompt_tps = T, T / (time.perf_counter() - tic)
    pc.tokens = list(history)

    tic = time.perf_counter()
    emitted = 0

    def emit(t: int) -> bool:
        nonlocal emitted
        emitted += 1
        pc.tokens.append(t)
        history.append(t)
        stats.generation_tokens = emitted
        return t in eos_ids or emitted >= max_tokens

    tok = mx.array(token)
    # MTP input not yet run: main hidden states (1, L, D) of the positions after the MTP cache's last, and
    # the tokens that follow them. A draft step runs it at once; a stretch of plain steps collects it.
    pend_h, pend_t = [h_last[:, None]], [token]
    ahead = None  # a plain step queued before the consumer got the previous token
    traced: set[int] = set()  # MTP input lengths the compiled draft step has seen
    try:
        done = emit(token)
        yield token
        last = time.perf_counter()
        while not done:
            if policy.mode == "draft":
                fair = len(pend_t) in traced  # its first call with 1 or 2 positions traces and compiles
                traced.add(len(pend_t))
                q_logits = drafter(mx.concatenate(pend_h, axis=1), mx.array(pend_t)[None])
                if len(pend_t) > 2:  # the eager catch-up forward is not timed
                    mx.eval(q_logits)
                    last = time.perf_counter()
                # Everything up to the accept decision stays lazy: one host sync per draft.
                recent0 = recent(options, history)
                if options.greedy:
                    draft = mx.argmax(options.penalized(q_logits[0], recent0))
                else:
                    q = _distribution(options, q_logits[0], recent0)
                    draft = options.draw_from(q)
                logits, hidden = verify(mx.stack([tok, draft])[None], cache)  # positions of token and draft
                recent1 = recent(options, history, draft)
                if options.greedy:
                    accept, correction, bonus = accept_greedy(options, draft, logits[0], recent0, recent1)
                else:
                    accept, correction, bonus = accept_sampled(options, draft, q, logits[0], recent0, recent1)
                mx.eval(accept, draft, bonus, correction)
                stats.drafted += 1
                accepted = accept.item()
                if accepted:
                    stats.accepted += 1
                    new = [draft.item(), bonus.item()]
                    tok = bonus
                else:
                    for c in cache:
                        c.trim(1)  # the rejected draft's position
                    new = [correction.item()]
                    hidden, tok = hidden[:, :1], correction
                pend_h, pend_t = [hidden], list(new)
            else:
                hidden, tok = ahead if ahead is not None else plain_step(tok, recent(options, history))
                new = [tok.item()]
                pend_h.append(hidden)
                pend_t.extend(new)
                accepted, fair = None, True
            now = time.perf_counter()
            policy.record("plain" if accepted is None else "draft", now - last if fair else None, accepted)
            last = now
            ahead = None
            if policy.mode == "plain" and not (new[-1] in eos_ids or emitted + len(new) >= max_tokens):
                ahead = plain_step(tok, recent(options, history + new))  # queued before the tokens are handed out
                mx.async_eval(ahead[1])
            for t in new:
                done = emit(t)
                yield t
                if done:
                    break
    finally:  # also when the consumer stops early: the caches hold exactly pc.tokens
        n = min(cache[0].offset, len(pc.tokens))
        for c in cache:
            c.trim(c.offset - n)
        pc.tokens = pc.tokens[:n]
        held = mx.concatenate(pend_h + ([ahead[0]] if ahead is not None else []), axis=1)
        wanted = n - drafter.cache.offset  # positions whose MTP entry waits for its next token
        pc.mtp_hidden = held[:, :wanted] if 0 <= wanted <= held.shape[1] else None
        stats.generation_tps = emitted / max(time.perf_counter() - tic, 1e-9)
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        stats.draft_summary = policy.summary()
        need = policy.break_even()
        stats.drafting_paid = bool(need is not None and stats.drafted and stats.accepted > need * stats.drafted)
