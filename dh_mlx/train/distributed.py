"""Data-parallel training over `mx.distributed` (launched by `mlx.launch`; one process and world of 1 otherwise).

Every rank draws the same global batch (`batch_size x ranks` rows, one seeded order) and reads and computes on its
own rows only, with the global batch's token counts (summed over the ranks), so each rank's loss and gradients are
its share of the global batch's and their sum across ranks is exactly the single-process step: the gradient tree
goes through a few large `all_sum`s (flattened into buckets), as do the loss parts and the experts' loads (ALF then
moves every rank's routing biases identically). Rank 0 alone writes metrics, checkpoints and the model; it also
reads the checkpoint on `--resume` and sends it to the others, so only its machine needs the run directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .data import Batch as NpBatch
from .loss import mtp_mask

BUCKET_BYTES = 64 << 20  # per all_sum: large enough that the link, not the call, sets the time


@dataclass
class World:
    group: Any  # mx.distributed.Group
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank writes (metrics, checkpoints, the model, the progress bar)."""
        return self.rank == 0


def world() -> World:
    """This process's place among the ranks `mlx.launch` started (a world of one without it)."""
    group = mx.distributed.init()
    return World(group, group.rank(), group.size())


def global_counts(batch: NpBatch, w: World) -> tuple[mx.array, mx.array]:
    """(target tokens, MTP target tokens) of the whole global batch, from this rank's rows (`batch`) summed over
    the ranks: what every rank's losses divide by."""
    m = mx.array(batch.loss_mask)
    counts = mx.stack([m.sum(), mtp_mask(m).sum()])
    if w.size > 1:
        counts = mx.distributed.all_sum(counts, group=w.group)
        mx.eval(counts)  # now: every rank's collectives in the same order
    return counts[0], counts[1]


class Reducer:
    """Sums trees of arrays across the ranks in buckets of about `bucket_bytes`; counts bytes and time."""

    def __init__(self, w: World, bucket_bytes: int = BUCKET_BYTES):
        self.w, self.bucket_bytes = w, bucket_bytes
        self.bytes, self.seconds, self.calls = 0, 0.0, 0

    def sum(self, tree: Any) -> Any:
        """The tree summed over the ranks, evaluated; one all_sum per bucket of same-dtype leaves."""
        flat = tree_flatten(tree)
        mx.eval([v for _, v in flat])
        tic = time.perf_counter()
        out: list = [None] * len(flat)
        buckets: dict[Any, list[list[int]]] = {}
        filled: dict[Any, int] = {}  # bytes in each dtype's last bucket
        for i, (_, v) in enumerate(flat):
            groups = buckets.setdefault(v.dtype, [[]])
            if groups[-1] and filled[v.dtype] + v.nbytes > self.bucket_bytes:
                groups.append([])
                filled[v.dtype] = 0
            groups[-1].append(i)
            filled[v.dtype] = filled.get(v.dtype, 0) + v.nbytes
        for groups in buckets.values():
            for idx in groups:
                joined = mx.concatenate([flat[i][1].reshape(-1) for i in idx])
                summed = mx.distributed.all_sum(joined, group=self.w.group)
                self.bytes += joined.nbytes
                self.calls += 1
                offsets = np.cumsum([0] + [flat[i][1].size for i in idx])
                for i, a, b in zip(idx, offsets[:-1], offsets[1:]):
                    out[i] = summed[int(a):int(b)].reshape(flat[i][1].shape)
        mx.eval(out)
        self.seconds += time.perf_counter() - tic
        return tree_unflatten([(k, v) for (k, _), v in zip(flat, out)])

    def take(self) -> dict:
        """Bytes, seconds and all_sum calls since the last call."""
        got = {"comm_bytes": self.bytes, "comm_s": self.seconds, "comm_calls": self.calls}
        self.bytes, self.seconds, self.calls = 0, 0.0, 0
        return got


def broadcast(tree: Any, w: World) -> Any:
    """Rank 0's values of a tree every rank holds in the same shapes (the others send zeros)."""
    if w.size == 1:
        return tree
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])  # the same order on every rank, however built
    sent = [v if w.main else mx.zeros_like(v) for _, v in flat]
    got = Reducer(w).sum(sent)
    return tree_unflatten([(k, v) for (k, _), v in zip(flat, got)])


def broadcast_json(value: Any, w: World) -> Any:
    """Rank 0's JSON-serialisable value, on every rank."""
    if w.size == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if w.main else np.zeros(0, np.uint8)
    n = int(broadcast([mx.array([data.size], mx.int32)], w)[0].item())
    padded = np.zeros(n, np.int32)
    padded[: data.size] = data
    got = np.array(broadcast([mx.array(padded)], w)[0]).astype(np.uint8)
    return json.loads(got.tobytes().decode())


def any_rank(flag: bool, w: World) -> bool:
    """Whether `flag` holds on some rank (e.g. a stop signal that reached one process)."""
    if w.size == 1:
        return flag
    return bool(mx.distributed.all_sum(mx.array([int(flag)]), group=w.group).item())


class RankFailure(RuntimeError):
    """Rank 0 stopped before training; the message is its own."""


def on_main(w: World, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on rank 0 (None on the others); if it raises, every rank stops, none waiting in a
    collective for one that left."""
    failure, result = None, None
    if w.main:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            failure = e
    if w.size > 1 and any_rank(failure is not None, w):
        message = broadcast_json(str(failure) if w.main else None, w)  # every rank says why (a launcher stops
        if not w.main:                                                 # them all when the first one exits)
            raise RankFailure(f"rank 0: {message}")
    if failure is not None:
        raise failure
    return result
