"""`dh-mlx data prepare`: JSONL (files, folders, globs) into prepared token shards (`shards.py`, docs/data.md).

The input is cut into chunks of whole lines at fixed byte offsets (so the output does not depend on the number
of workers); worker processes, one per core, each turn a chunk into one shard, streaming (memory does not grow
with the corpus). A finished chunk leaves a record in `OUT/.tmp-prepare/`, so an interrupted run continues
where it stopped when run again; `manifest.json` is written last, the only mark of a complete directory.
`prepared_cache` is the same for `train --data x.jsonl`: prepared once into a cache keyed by the files'
contents and the tokenizer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..files import format_bytes, open_nofollow
from ..outputs import OutputError, check_output_dir
from ..progress import Task, status
from .prepare_worker import current_rss, peak_rss, prepare_chunk
from .records import DataError, DataSummary, jsonl_files
from .shards import (FORMAT, KINDS, MANIFEST, VERSION, WORK, file_sha256, shard_path, token_dtype, tokenizer_digest,
                     write_json_atomic)

MAX_MEMORY = 1.5e9  # bytes: what preparing adds (its workers, and this process's growth)
# A worker's peak: the interpreter, numpy and its buffers (58 MB measured with the bundled tokenizer, whose own
# share is ~2 MB), plus what its tokenizer takes (measured as this process loads it).
WORKER_BYTES = 60e6
FLUSH_TOKENS = 1 << 20
SMALL = 16 << 20  # bytes of JSONL below which one process prepares (starting workers would take longer)
# Workers need no fast BLAS (`import dh_mlx` would load one), and one thread each.
WORKER_ENV = {"DH_MLX_BLAS": "off", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false"}


def resolve_inputs(data: Sequence[str | Path]) -> list[Path]:
    """The JSONL files of `data` (files, folders searched for `*.jsonl`, glob patterns), each once, in order."""
    files, seen = [], set()
    for item in [data] if isinstance(data, (str, Path)) else data:
        text = str(item)
        if not Path(text).exists() and glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"{text}: no file matches this pattern")
            found = [f for m in matches for f in jsonl_files(m)]
        else:
            found = jsonl_files(text)
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    if not files:
        raise DataError("no input files given")
    return files


@dataclass
class Chunk:
    index: int
    file: int  # index into the input files
    start: int
    end: int
    key: str  # what decides the chunk's shard: a record with another key is redone


def default_chunk_bytes(total: int) -> int:
    """About 256 chunks (enough to keep many cores busy), each 1 to 64 MB."""
    return int(min(64 << 20, max(1 << 20, total // 256)))


def plan_chunks(files: list[Path], chunk_bytes: int, common: list) -> list[Chunk]:
    """Byte ranges of whole lines, starting every `chunk_bytes` at the next line start."""
    chunks = []
    for fi, path in enumerate(files):
        st = path.stat()
        bounds = [0]
        with open(path, "rb") as f:
            while bounds[-1] + chunk_bytes < st.st_size:
                f.seek(bounds[-1] + chunk_bytes - 1)
                f.readline()  # to the first line that starts at or after the target
                if f.tell() >= st.st_size:
                    break
                bounds.append(f.tell())
        bounds.append(st.st_size)
        for a, b in zip(bounds[:-1], bounds[1:]):
            key = json.dumps([*common, str(path.resolve()), st.st_size, st.st_mtime_ns, a, b])
            chunks.append(Chunk(len(chunks), fi, a, b, hashlib.sha256(key.encode()).hexdigest()))
    return chunks


@dataclass
class PrepareResult:
    path: Path
    summary: DataSummary
    documents: int
    shards: int
    bytes_in: int  # JSONL bytes read by this run (chunks already done by an interrupted run not counted)
    tokens_in: int  # tokens written by this run
    seconds: float
    peak_bytes: int  # the sum of every process's peak resident memory (an upper bound of the peak in total)
    workers: int
    reused: int  # chunks an interrupted run had finished

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_in / max(self.seconds, 1e-9)


def _check_out(out: Path, inputs: list, force: bool) -> Path:
    """An output directory, or one an interrupted prepare left (continued without --force)."""
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; give the directory itself as `out`")
    ours = re.compile(r"(shard-\d{5}\.[a-z]+|\.tmp-.*)$")
    unfinished = (out / WORK).is_dir() and all(ours.match(p.name) for p in out.iterdir())
    check_output_dir(out, inputs=inputs, force=force or unfinished)
    if (out / MANIFEST).exists():  # --force: first of all it stops looking complete
        (out / MANIFEST).unlink()
    return out


def _done_chunks(out: Path, chunks: list[Chunk]) -> dict[int, dict]:
    """Chunks an earlier run finished with the same key, whose shard files are all there."""
    done = {}
    for c in chunks:
        record = out / WORK / f"chunk-{c.index:05d}.json"
        try:
            saved = json.loads(record.read_text()) if record.is_file() else None
        except ValueError:
            saved = None
        if saved and saved.get("key") == c.key and all(shard_path(out, c.index, k).is_file() for k in KINDS):
            done[c.index] = saved["stats"]
    return done


class _Progress:
    """How far a prepare is (MB read, MB/s, tokens/s): a progress task while it runs (shown by the CLI after a
    couple of seconds), and the final line as a status line."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()
        self.task = Task("prepare", round(total / 1e6, 1), "MB") if enabled else None

    def update(self, done: int, new_bytes: int, new_tokens: int, workers: int, final: bool = False) -> None:
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self.start, 1e-9)
        rates = (f"{new_bytes / 1e6 / dt:.1f} MB/s | {new_tokens / 1e6 / dt:.2f} M tokens/s | {workers} "
                 "worker(s)")
        self.task.advance(round(done / 1e6, 1) - self.task.done, rates)
        if final:
            self.task.__exit__()
            status(f"prepare: {done / 1e6:.1f}/{self.total / 1e6:.1f} MB ({done / max(self.total, 1):.0%}) | {rates}")


def _run(tasks: list[dict], workers: int, on_done) -> None:
    """Run the chunk tasks in order of submission, in this process for one worker, else in worker processes
    (plain subprocesses: no re-import of the caller's main module), one task each at a time. `on_done(stats)`
    says whether to go on (False after an error: the chunks before it still finish, none after it start)."""
    if workers <= 1:
        for t in tasks:
            if not on_done(prepare_chunk(t)):
                return
        return
    import select
    import signal
    import subprocess
    import threading
    here = str(Path(__file__).resolve().parents[2])  # the workers import this very dh_mlx
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    procs = [subprocess.Popen([sys.executable, "-m", "dh_mlx.train.prepare_worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env={**os.environ, **WORKER_ENV, "PYTHONPATH": path},
                              text=True) for _ in range(workers)]

    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM as Ctrl-C: the workers are stopped, not left behind
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, stop) if main else None
    clean = False  # every task done: the workers are let go (their stdin closes), else killed
    try:
        todo, busy, stop_at = iter(tasks), {}, None  # busy: stdout fd -> (process, task index)
        for proc in procs:
            if (t := next(todo, None)) is not None:
                proc.stdin.write(json.dumps(t) + "\n")
                proc.stdin.flush()
                busy[proc.stdout.fileno()] = (proc, t["index"])
        while busy:
            ready, _, _ = select.select(list(busy), [], [], 0.05)
            on_done(None)  # (progress)
            for fd in ready:
                if fd not in busy:  # (a later chunk's, after an error)
                    continue
                proc, index = busy.pop(fd)
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"a prepare worker stopped (exit code {proc.wait()}) on chunk {index}")
                result = json.loads(line)
                if "failed" in result:
                    raise RuntimeError(f"a prepare worker failed on chunk {index}: {result['failed']}")
                if not on_done(result) and (stop_at is None or index < stop_at):
                    stop_at = index
                    busy = {f: b for f, b in busy.items() if b[1] < stop_at}  # the chunks before it finish
                if stop_at is None and (t := next(todo, None)) is not None:
                    proc.stdin.write(json.dumps(t) + "\n")
                    proc.stdin.flush()
                    busy[fd] = (proc, t["index"])
        clean = stop_at is None
    finally:
        if main:
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
        for proc in procs:
            if clean:
                proc.stdin.close()
            else:
                proc.kill()
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:  # (a killed worker's pipe)
                    pass


def prepare(data: Sequence[str | Path] | str | Path, out: str | Path, tokenizer: str | Path | None = None, *,
            skip_invalid: bool = False, workers: int | None = None, max_memory: float = MAX_MEMORY,
            chunk_bytes: int | None = None, force: bool = False, progress: bool = True) -> PrepareResult:
    """Tokenize the JSONL `data` with `tokenizer` (a directory; default the bundled one) into the prepared directory
    `out`. `workers` defaults to every core, fewer when `max_memory` (bytes: the workers and what this process adds
    to what it held when called) would not hold them; an invalid line is an error naming `file:line`, or with
    `skip_invalid` counted and skipped. An interrupted run is continued by running it again (without `force`)."""
    from ..config import DATA_DIR
    from ..tokenizer import load_tokenizer
    tic, held = time.perf_counter(), current_rss()
    files = resolve_inputs(data)
    tok_dir = Path(tokenizer) if tokenizer else DATA_DIR / "tokenizer"
    before = current_rss()
    tok = load_tokenizer(tok_dir)
    if tok is None:
        raise ValueError(f"{tok_dir}: no tokenizer.model or tokenizer.json (pass `tokenizer`)")
    per_worker = WORKER_BYTES + max(0, current_rss() - before)
    out = _check_out(Path(out), [*files, tok_dir], force)
    (out / WORK).mkdir(parents=True, exist_ok=True)
    for p in out.glob(".tmp-shard-*"):  # what a killed worker was writing
        p.unlink()
    digest, dtype = tokenizer_digest(tok), token_dtype(tok.vocab_size)
    total = sum(f.stat().st_size for f in files)
    chunk_bytes = chunk_bytes or default_chunk_bytes(total)
    chunks = plan_chunks(files, chunk_bytes, [FORMAT, VERSION, digest, dtype, skip_invalid])
    stats = _done_chunks(out, chunks)
    reused = len(stats)
    todo = [c for c in chunks if c.index not in stats]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    grown = max(0, current_rss() - held)
    if max_memory < grown + per_worker / 2:
        raise ValueError(f"max memory {format_bytes(max_memory)} is less than preparing needs (about "
                         f"{format_bytes(grown + per_worker / 2)})")
    size = {c.index: c.end - c.start for c in chunks}
    small = workers is None and sum(size[c.index] for c in todo) < SMALL  # not worth starting processes for
    n = 1 if small else max(1, min(workers or cores, len(todo), int((max_memory - grown) // per_worker)))
    tasks = [{"index": c.index, "path": str(files[c.file]), "start": c.start, "end": c.end, "key": c.key,
              "out": str(out), "tokenizer": str(tok_dir), "dtype": dtype, "skip_invalid": skip_invalid,
              "flush_tokens": FLUSH_TOKENS} for c in todo]
    bar = _Progress(total, progress)
    done = [sum(size[i] for i in stats), 0, 0]  # bytes done in all; bytes and tokens by this run
    peaks: dict[int, int] = {}
    errors: dict[int, dict] = {}

    def on_done(s: dict | None) -> bool:
        """Count a finished chunk (None: only report progress); False for a chunk that found an error."""
        if s is not None:
            peaks[s["pid"]] = max(peaks.get(s["pid"], 0), s["peak"])
            if s["error"]:
                errors[s["index"]] = s
                return False
            stats[s["index"]] = s
            done[0] += size[s["index"]]
            done[1] += size[s["index"]]
            done[2] += s["shard"]["tokens"]
        bar.update(done[0], done[1], done[2], n)
        return True

    try:
        _run(tasks, n, on_done)
    except KeyboardInterrupt:
        status(f"interrupted: {len(stats)} of {len(chunks)} chunks are done in {out}; run the same command again "
               "to continue")
        raise
    summary, manifest = _assemble(files, chunks, stats, errors, skip_invalid)
    bar.update(done[0], done[1], done[2], n, final=True)
    manifest.update(token_dtype=dtype, chunk_bytes=chunk_bytes, tokenizer={
        "sha256": digest, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "pad_id": tok.pad_id})
    manifest["id"] = hashlib.sha256(json.dumps([manifest["token_dtype"], digest, manifest["shards"]]).encode()
                                    ).hexdigest()
    for p in out.glob("shard-*.*"):  # shards of an earlier, larger run in this directory
        if int(p.name[6:11]) >= len(chunks):
            p.unlink()
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / WORK)
    peak = peak_rss() + sum(peaks.values()) if n > 1 else max([peak_rss(), *peaks.values()])
    return PrepareResult(out, summary, manifest["documents"], len(chunks), done[1], done[2],
                         time.perf_counter() - tic, peak, n, reused)


def _assemble(files: list[Path], chunks: list[Chunk], stats: dict[int, dict], errors: dict[int, dict],
              skip_invalid: bool) -> tuple[DataSummary, dict]:
    """The summary `train` prints (line numbers counted from each file's start) and the manifest's body; the
    first error in file and line order raised as `train` raises it."""
    summary, shards, labels, first = DataSummary(files=len(files)), [], {}, {}
    by_file: dict[int, list[Chunk]] = {}
    for c in chunks:
        by_file.setdefault(c.file, []).append(c)
    for fi, path in enumerate(files):
        lines_before, seen = 0, 0
        for c in by_file.get(fi, []):
            s = stats.get(c.index) or errors.get(c.index)
            if c.index in errors:
                raise DataError(f"{path}:{lines_before + s['error'][0]}: {s['error'][1]}")
            seen += s["seen"]
            summary.records += s["records"]
            summary.blank_lines += s["blank"]
            for reason, k in s["skipped"].items():
                summary.skipped[reason] = summary.skipped.get(reason, 0) + k
            for line, detail in s["examples"]:
                if len(summary.examples) < 5:
                    summary.examples.append(f"{path}:{lines_before + line}: {detail}")
            for label, k in s["labels"].items():
                summary.domains[label] = summary.domains.get(label, 0) + k
                first.setdefault(label, f"{path}:{lines_before + s['first'][label]}")
            shards.append(s["shard"])
            lines_before += s["lines"]
        if not seen:
            if not skip_invalid:
                raise DataError(f"{path}:1: empty file (no JSONL records)")
            summary.skip(f"{path}:1: empty file (no JSONL records)", "empty file")
    summary.tokens = sum(s["tokens"] for s in shards)
    labels = sorted(n for n in summary.domains if n != "-")
    manifest = {"format": FORMAT, "version": VERSION, "documents": summary.records, "tokens": summary.tokens,
                "labels": labels, "first_line": first, "summary": {
                    "files": summary.files, "records": summary.records, "blank_lines": summary.blank_lines,
                    "skipped": summary.skipped, "examples": summary.examples, "domains": summary.domains,
                    "tokens": summary.tokens},
                "sources": [{"path": str(p), "bytes": p.stat().st_size} for p in files], "shards": shards}
    return summary, manifest


# ---- the cache `train --data x.jsonl` reads ---------------------------------------------------------------
def cache_root() -> Path:
    """`$DH_MLX_DATA_CACHE`, else `~/.cache/dh_mlx/data` (under `$XDG_CACHE_HOME` when set)."""
    if os.environ.get("DH_MLX_DATA_CACHE"):
        return Path(os.environ["DH_MLX_DATA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dh_mlx" / "data"


def prepared_cache(data, tokenizer, *, skip_invalid: bool = False, progress: bool = True) -> Path:
    """The prepared directory of the JSONL `data` under `tokenizer` (a loaded one): found in the cache by the
    files' contents (SHA-256) and the tokenizer's, else prepared into it first. Processes that ask at once
    (data-parallel ranks) wait for the one that prepares."""
    import fcntl

    from .shards import is_prepared
    files = resolve_inputs(data)
    key = hashlib.sha256(json.dumps([FORMAT, VERSION, tokenizer_digest(tokenizer), skip_invalid,
                                     [(str(f.resolve()), file_sha256(f)) for f in files]]).encode()).hexdigest()
    root = cache_root()
    d = root / key[:24]
    if is_prepared(d):
        return d
    root.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_nofollow(root / f".{d.name}.lock", os.O_RDWR | os.O_CREAT), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_prepared(d):
            size = sum(f.stat().st_size for f in files)
            progress = progress and size >= SMALL  # (a small corpus takes a second: nothing to report)
            if progress:
                status(f"data: preparing {len(files)} file(s), {format_bytes(size)} of JSONL, into {d} (once: later "
                       "runs and resumed ones read it from there)")
            r = prepare(files, d, Path(tokenizer.path).parent, skip_invalid=skip_invalid, force=True,
                        progress=progress)
            if progress:
                status(describe_result(r))
    return d


def describe_result(r: PrepareResult) -> str:
    reused = f", {r.reused} chunk(s) from the interrupted run" if r.reused else ""
    return (f"prepared {r.path}: {r.summary}; {r.shards} shard(s) in {r.seconds:.1f} s ({r.mb_per_s:.1f} MB/s, "
            f"{r.tokens_per_s / 1e6:.2f} M tokens/s, {r.workers} worker(s){reused}), peak memory "
            f"{format_bytes(r.peak_bytes)}")

