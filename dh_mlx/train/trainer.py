"""The training loop: compiled step (one `mx.eval` per step), ALF balancing, validation, checkpoints, resume.

Whatever parameters of the model are trainable get trained (full training freezes only the router's selection
bias; LoRA freezes everything but the adapters), so `dh-mlx train` and `dh-mlx lora` share this loop.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .. import backend
from ..progress import own_files_replaced
from ..model import Model
from ..model.moe import MoE, MoEGate
from ..checkpoint.training import (CheckpointWriteError, RunLock, latest_checkpoint, load_checkpoint,
                                   remove_checkpoints, remove_partial, save_checkpoint)
from .config import TrainConfig
from .optim import AdamW, make_optimizer
from .data import Dataset
from .distributed import (Reducer, World, any_rank, broadcast, broadcast_json, global_counts, on_main,
                          world)
from .evaluate import EvalResult, drop_domains, evaluate, to_mx
from .interrupt import Interrupted, StopRequest, stop_on_signals
from ..files import format_bytes
from ..progress import note
from .report import LogReport, MetricsLog, directory_bytes
from .loss import Batch, Counts, alf_update, batch_counts, imbalance, loss_parts


class TrainingError(RuntimeError):
    """A run that must stop (non-finite loss, a run directory that would be overwritten)."""


def moe_gates(model: Model) -> list[MoEGate]:
    """Routers of the main stack, then of the MTP modules: the order `loss_parts` reports loads in."""
    return [l.mlp.gate for l in model.model.layers if isinstance(l.mlp, MoE)]


@dataclass
class StepFunctions:
    """Compiled pieces of one optimizer step; `state` is what they read and write besides their arguments.
    Evaluate what they return with `eval`, which runs the BLAS as the step was built for."""

    step: Callable  # (*batch) -> (loss, ce, mtp, balance, loads, grad_norm)          [grad_accum == 1]
    grads: Callable  # (*batch) -> (loss, ce, mtp, balance, loads, grads)             [grad_accum > 1]
    apply: Callable  # (grads, loads) -> grad_norm
    state: list
    shared_grads: Callable | None = None  # (tokens, mtp_tokens, *rows) -> as `grads`, shares of a global batch
    blas_threads: int | None = None  # threads per BLAS call while evaluating (None: as configured)

    def eval(self, *arrays) -> None:
        """`mx.eval(*arrays, state)`."""
        with backend.blas_threads(self.blas_threads):
            mx.eval(*arrays, self.state)


AUTO = "auto"


def build_steps(model: Model, optimizer: AdamW, cfg: TrainConfig, streams=AUTO, global_rows: int | None = None
                ) -> StepFunctions:
    """The compiled step functions. Given two `streams` (default: `backend.training_streams()`, the CPU's
    when MLX evaluates wide enough), the batch's rows are split in two halves, each half's forward and backward
    pass on its own stream, the BLAS one thread per call, and the halves' gradients summed: the same loss and
    gradients as one pass over the batch (the halves' losses are their shares of the batch's).
    With `global_rows` (data-parallel), `shared_grads` gives this rank's rows' shares of a global batch of
    that many rows, from its token counts.
    """
    gates = moe_gates(model)
    mtp_lambda = cfg.mtp_lambda if model.config.num_nextn_predict_layers else 0.0
    if streams == AUTO:
        streams = backend.training_streams()
    if cfg.batch_size < 2:
        streams = None

    # Distilling the MTP modules leaves the main model as it is, its routers' selection biases included.
    balanced = [l.mlp.gate for l in model.model.mtp_layers if isinstance(l.mlp, MoE)] if cfg.mtp_distill else gates

    def loss_fn(model, counts, *arrays):
        return loss_parts(model, Batch(*arrays), mtp_lambda=mtp_lambda, balance_alpha=cfg.balance_alpha,
                          counts=counts, mtp_distill=cfg.mtp_distill)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def halves_grads(counts, *arrays):
        h = (arrays[0].shape[0] + 1) // 2
        results = []
        for stream, rows in zip(streams.pair(), (slice(0, h), slice(h, None))):
            with streams.running(stream):
                (loss, parts), g = value_and_grad(model, counts, *(a[rows] for a in arrays))
            results.append(((loss, *parts), g))
        (v1, g1), (v2, g2) = results
        return (*(a + b for a, b in zip(v1, v2)), optimizer.sum_gradients([g1, g2]))

    def apply(grads, loads):
        norm = optimizer.clip_and_update(model, grads, cfg.grad_clip)
        if cfg.alf_gamma and balanced and loads.shape[0]:
            new = alf_update([g.e_score_correction_bias for g in balanced], loads[len(gates) - len(balanced):],
                             cfg.alf_gamma, balanced[0].n_base)
            for g, b in zip(balanced, new):
                g.e_score_correction_bias = b
        return norm

    def grads(*arrays, counts=None):
        if streams is not None and arrays[0].shape[0] >= 2:
            return halves_grads(counts or batch_counts(Batch(*arrays)), *arrays)
        (loss, parts), g = value_and_grad(model, counts, *arrays)
        return loss, parts.ce, parts.mtp, parts.balance, parts.loads, g

    def shared_grads(tokens, mtp_tokens, *arrays):
        return grads(*arrays, counts=Counts(tokens, mtp_tokens, global_rows))

    def step(*arrays):
        loss, ce, mtp, bal, loads, g = grads(*arrays)
        return loss, ce, mtp, bal, loads, apply(g, loads)

    compile_ = partial(mx.compile, inputs=state, outputs=state)
    return StepFunctions(compile_(step), compile_(grads), compile_(apply), state,
                         shared_grads=compile_(shared_grads) if global_rows else None,
                         blas_threads=1 if streams else None)


@dataclass
class RunResult:
    step: int
    train_loss: float  # the last step's cross-entropy (without the MTP and balance terms)
    val: EvalResult | None
    tokens_per_s: float
    peak_memory_gb: float
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)
    run_dir: Path | None = None
    run_bytes: int = 0  # what the run directory takes on disk at the end
    signal: int | None = None  # the signal that stopped the run (it saved a checkpoint first)
    rank: int = 0  # this process's rank under mlx.launch (0 writes and reports)


def train_loop(model: Model, dataset: Dataset, cfg: TrainConfig, run_dir: Path, *,
               export: Callable[[Path], None], resume: bool = False, force: bool = False, progress: bool = True,
               stop_after: int | None = None, w: World | None = None, export_bytes: int | None = None
               ) -> RunResult:
    """Train `model` in place for `cfg.steps` optimizer steps, checkpointing into `run_dir`.

    `export_bytes`: about what `export` writes (the free-space check before a checkpoint counts it; default the
    whole model; LoRA writes only its adapters).

    `export(dir)` writes the usable result (model directory, or adapters) at each checkpoint. `stop_after` ends the run early
    after that many steps of this invocation, checkpointed like a Ctrl-C (used by the resume test).
    Under `mlx.launch` (`w`, default: this process's world) the ranks train data-parallel (.distributed);
    only rank 0 touches `run_dir`.
    """
    w = w or world()
    if w.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir) if w.main else None
    try:
        with stop_on_signals() as stop:
            return _train(model, dataset, cfg, run_dir, export=export, resume=resume, force=force,
                          progress=progress and w.main, stop_after=stop_after, stop=stop, w=w,
                          export_bytes=export_bytes)
    finally:
        if lock:
            lock.release()


def _restore(model: Model, optimizer: AdamW, batches, cfg: TrainConfig, run_dir: Path, *, resume: bool,
             force: bool, ranks: int = 1, created: list[str] | None = None) -> int:
    """Rank 0's start: the step to continue from (model, optimizer and data position restored), or 0;
    `created` gets the names of the checkpoints the run wrote (the only ones its rotation may remove)."""
    remove_partial(run_dir)
    ckpt = latest_checkpoint(run_dir, report=True) if resume else None
    if resume and ckpt is None:
        raise TrainingError(f"{run_dir}: no checkpoint to resume from; drop `resume` (with `force=True`) to start afresh")
    if resume:
        state, opt_state = load_checkpoint(ckpt)
        if state.get("ranks", 1) != ranks:  # the data position is one of global batches of batch_size x ranks
            raise TrainingError(f"{ckpt}: saved by a run on {state.get('ranks', 1)} rank(s); resume it on as many "
                                f"(this run has {ranks})")
        model.load_weights(list(_resumable_weights(model, ckpt).items()), strict=False)
        optimizer.state = opt_state
        batches.load_state_dict(state["data"])
        if created is not None:
            created.extend(state.get("checkpoints", [ckpt.name]))
        saved = state.get("train_config", {})
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in cfg.to_dict().items() if k in saved and saved[k] != v]
        if changed:  # allowed (e.g. more steps), but the schedule and data order follow the new values
            note(f"resuming {ckpt.name} with other training options: {', '.join(changed)}")
        return state["step"]
    if (run_dir / "checkpoints").exists() and force:  # a fresh run in place of the old one, as asked
        removed = remove_checkpoints(run_dir)
        if removed:
            note(f"{run_dir / 'checkpoints'}: removed the earlier run's {', '.join(removed)}")
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*")):
        raise TrainingError(f"{run_dir} already holds a run; pass `resume=True` to continue it, `force=True` to "
                            "start afresh, or choose another `out`")
    return 0


def _last_good(run_dir: Path, w: World) -> str:
    """Where a stopped run can continue from, in words: its newest intact checkpoint, or that it has none."""
    try:
        ckpt = latest_checkpoint(run_dir) if w.main else None
    except ValueError:
        ckpt = None
    return (f"the last good checkpoint is {ckpt}: `resume=True` continues from it" if ckpt is not None
            else "the run has no checkpoint yet")


def _share_start(model: Model, optimizer: AdamW, batches, start: int, resume: bool, w: World) -> int:
    """Every rank from rank 0's start: its trained weights, optimizer state and data position."""
    start = broadcast_json(start, w)
    if resume:
        if not w.main:
            optimizer.init(model.trainable_parameters())  # the shapes rank 0's loaded state fills
        optimizer.state = broadcast(optimizer.state, w)
    model.load_weights(list(broadcast(_changing_params(model), w).items()), strict=False)
    state = broadcast_json(batches.state_dict(), w)
    if not w.main:
        batches.load_state_dict(state)
    return start


def _train(model: Model, dataset: Dataset, cfg: TrainConfig, run_dir: Path, *, export: Callable[[Path], None],
           resume: bool, force: bool, progress: bool, stop_after: int | None, stop: StopRequest, w: World,
           export_bytes: int | None = None) -> RunResult:
    optimizer = make_optimizer(cfg)
    part = (w.rank, w.size)  # each rank reads its own rows of the global batch
    batches = dataset.train_batches(cfg.batch_size * w.size, seed=cfg.seed, part=part)
    created: list[str] = []  # the checkpoints this run wrote
    start = on_main(w, _restore, model, optimizer, batches, cfg, run_dir, resume=resume, force=force,
                    ranks=w.size, created=created) or 0
    if w.size > 1:
        start = _share_start(model, optimizer, batches, start, resume, w)
    mx.random.seed(cfg.seed + start + 1_000_003 * w.rank)  # (dropout: each rank its own draws)
    log = MetricsLog(run_dir / "metrics.jsonl", start if resume else None) if w.main else None
    fns = build_steps(model, optimizer, cfg, global_rows=cfg.batch_size * w.size if w.size > 1 else None)
    reducer = Reducer(w)
    history: list[dict] = []

    # Where the data stood after the last completed step: a Ctrl-C inside a step must not skip its batches.
    data_state = batches.state_dict()

    if export_bytes is None:
        export_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))

    def checkpoint(step: int) -> None:
        on_main(w, save, step)  # every rank calls it; a failure on rank 0 stops them all, none left waiting

    exported: list[int] = []  # steps whose model this run has written

    def save(step: int) -> None:
        changing = _changing_params(model)
        need = sum(v.nbytes for v in changing.values()) + export_bytes + sum(
            v.nbytes for _, v in tree_flatten(optimizer.state) if isinstance(v, mx.array))
        save_checkpoint(run_dir, step, write_weights=lambda d: mx.save_safetensors(
                            str(d / "weights.safetensors"), changing),
                        optimizer_state=optimizer.state,
                        trainer_state={"data": data_state, "train_config": cfg.to_dict(), "ranks": w.size},
                        keep=cfg.keep_checkpoints, expected_bytes=need, created=created)
        try:
            with own_files_replaced() if exported else nullcontext():  # (the first export says what it replaced)
                export(run_dir)
            exported.append(step)
        except Exception as e:
            free = format_bytes(shutil.disk_usage(run_dir).free)
            raise CheckpointWriteError(f"{run_dir}: writing the model failed ({free} free): {e}; checkpoint step "
                                       f"{step} is intact: `resume=True`") from None

    bar = LogReport(cfg.steps, start) if progress else None
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * w.size
    step, last_loss, tps, interrupted, stopped_by = start, float("nan"), 0.0, False, None
    val = None
    mx.reset_peak_memory()
    tic = time.perf_counter()

    def next_batch(micro: int):
        return drop_domains(next(batches), cfg.domain_dropout, cfg.seed, step * cfg.grad_accum + micro, part)

    def rank_grads(nb):
        """This rank's rows' shares of the global batch `nb` (data-parallel)."""
        return fns.shared_grads(*global_counts(nb, w), *to_mx(nb))

    def accumulated_step(grads_of):
        """The micro-batches' gradients, loads and loss parts summed (over the ranks too, in a few all_sums),
        averaged, then the update."""
        g_sum, loads, sums = None, 0, [0.0] * 4
        for micro in range(cfg.grad_accum):
            *values, loads_i, g = grads_of(next_batch(micro))
            g_sum = g if g_sum is None else tree_map(mx.add, g_sum, g)
            loads = loads + loads_i
            sums = [a + v for a, v in zip(sums, values)]
        if w.size > 1:
            fns.eval(g_sum, loads, *sums)
            g_sum, loads, sums = reducer.sum([g_sum, loads, sums])
        return (*(v / cfg.grad_accum for v in sums), loads,
                fns.apply(tree_map(lambda x: x / cfg.grad_accum, g_sum), loads))

    try:
        while step < cfg.steps:
            if w.size > 1:
                loss, ce, mtp, bal, loads, norm = accumulated_step(rank_grads)
            elif cfg.grad_accum == 1:
                loss, ce, mtp, bal, loads, norm = fns.step(*to_mx(next_batch(0)))
            else:
                loss, ce, mtp, bal, loads, norm = accumulated_step(lambda nb: fns.grads(*to_mx(nb)))
            fns.eval(loss, ce, mtp, bal, loads, norm)
            step += 1
            data_state = batches.state_dict()
            last_loss = ce.item()
            if not math.isfinite(loss.item()):
                raise TrainingError(f"step {step}: the loss is {loss.item()}; stopping ({_last_good(run_dir, w)}; "
                                    "try a lower learning rate)")
            now = time.perf_counter()
            tps = tokens_per_step / (now - tic)
            tic = now
            record = {"step": step, "loss": loss.item(), "ce": last_loss, "mtp": mtp.item(), "balance": bal.item(),
                      "lr": float(optimizer.learning_rate.item()), "grad_norm": norm.item(), "tokens_per_s": tps,
                      "imbalance": imbalance(loads).item() if loads.size > 1 and loads.sum().item() > 0 else None}
            if w.size > 1:
                record.update(ranks=w.size, **reducer.take())
            if seen := batches.tokens_seen():  # tokens drawn so far, by domain label or mixture component
                record[batches.seen_key] = seen
            if (step % cfg.eval_every == 0 or step == cfg.steps) and len(dataset.valid):
                val = evaluate(model, dataset, cfg, w=w)
                record.update(val_loss=val.loss, val_ppl=math.exp(min(val.loss, 50)), val_imbalance=val.imbalance,
                              val_mtp_agreement=val.mtp_agreement, domain_load=val.domain_load)
            if log:
                log.write(record)
            history.append(record)
            if bar:
                bar.update(step, record)
            if step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint(step)
            if stop_after is not None and step - start >= stop_after and step < cfg.steps:
                checkpoint(step)
                interrupted = True
                break
            if step < cfg.steps and w.size > 1 and any_rank(stop.signum is not None, w):
                raise Interrupted(stop.signum or signal.SIGTERM)  # every rank stops at the same step
            elif step < cfg.steps:  # (several ranks act on the shared answer above alone)
                stop.check()  # between steps: the weights, the data position and the step number agree
    except KeyboardInterrupt as e:
        interrupted, stopped_by = True, getattr(e, "signum", signal.SIGINT)
        checkpoint(step)
        if bar:
            bar.print(f"interrupted: saved step {step} to {run_dir}; continue with `resume=True`")
    finally:
        if bar:
            bar.stop()
    return RunResult(step, last_loss, val, tps, mx.get_peak_memory() / 1e9, interrupted, history,
                     run_dir, directory_bytes(run_dir) if w.main else 0, stopped_by, w.rank)


def _resumable_weights(model: Model, ckpt: Path) -> dict[str, mx.array]:
    """The checkpoint's weights, refused (naming the first differing tensor) unless they are exactly what this
    model trains: a --resume with another config must not train on with half-fitting tensors."""
    saved = mx.load(str(ckpt / "weights.safetensors"))
    expected = {k: v.shape for k, v in _changing_params(model).items()}
    for k in sorted(set(saved) | set(expected)):
        if k not in saved or k not in expected or tuple(saved[k].shape) != tuple(expected[k]):
            got = tuple(saved[k].shape) if k in saved else "absent"
            want = tuple(expected[k]) if k in expected else "absent"
            raise TrainingError(f"{ckpt}: tensor {k} is {got} in the checkpoint but {want} for this config; resume "
                                "with the run's own config, or start a new run in another `out`")
    return saved


def _changing_params(model: Model) -> dict[str, mx.array]:
    """What training changes: the trainable parameters and the ALF selection biases."""
    out = dict(tree_flatten(model.trainable_parameters()))
    out.update((k, v) for k, v in tree_flatten(model.parameters()) if k.endswith("e_score_correction_bias"))
    return out
