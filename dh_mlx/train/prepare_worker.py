"""A `dh-mlx data prepare` worker: one chunk of JSONL lines into one shard (`prepare_chunk`), in this process
or in a worker process (`python -m dh_mlx.train.prepare_worker`: one JSON task a line on stdin, one JSON result
a line on stdout, until stdin closes)."""

from __future__ import annotations

import json
import os
import resource
import sys
from functools import lru_cache
from pathlib import Path

from .data import tokenize
from .records import DataError, Record, _Invalid, parse_line
from .shards import WORK, ShardWriter, write_json_atomic


def peak_rss() -> int:
    """This process's peak resident memory, bytes (Linux: VmHWM, which unlike ru_maxrss does not count what the
    process held before exec, e.g. as a fork of a large parent)."""
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def current_rss() -> int:
    """This process's resident memory now, bytes (its peak where /proc is not there)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


@lru_cache(maxsize=2)
def _tokenizer(directory: str):
    from ..tokenizer import load_tokenizer
    return load_tokenizer(directory)


def prepare_chunk(task: dict) -> dict:
    """One chunk into one shard (run in a worker): counts, the first few skipped lines, the first line of each
    domain label and the shard's manifest entry; line numbers count from the chunk's first line."""
    tok, path = _tokenizer(task["tokenizer"]), Path(task["path"])
    out, skip = Path(task["out"]), task["skip_invalid"]
    stats = {"index": task["index"], "lines": 0, "blank": 0, "seen": 0, "records": 0, "skipped": {},
             "examples": [], "labels": {}, "first": {}, "error": None}
    writer = ShardWriter(out, task["index"], task["dtype"], task["flush_tokens"])
    try:
        with open(path, "rb") as f:
            f.seek(task["start"])
            pos, line = task["start"], 0
            while pos < task["end"]:
                raw = f.readline()
                pos, line = pos + len(raw), line + 1
                try:
                    parsed = parse_line(raw, first=task["start"] == 0 and line == 1)
                except _Invalid as e:
                    stats["seen"] += 1
                    if not skip:
                        stats["error"] = [line, e.detail]
                        break
                    stats["skipped"][e.reason] = stats["skipped"].get(e.reason, 0) + 1
                    if len(stats["examples"]) < 5:
                        stats["examples"].append([line, e.detail])
                    continue
                if parsed is None:
                    stats["blank"] += 1
                    continue
                stats["seen"] += 1
                domain, parts, messages = parsed
                try:
                    doc = tokenize(Record(path, line, domain, parts, messages), tok)
                except DataError as e:  # a chat template that renders a turn differently later: never skipped
                    stats["error"] = [line, str(e).removeprefix(f"{path}:{line}: ")]
                    break
                writer.add(doc.ids, doc.train, domain)
                label = domain or "-"
                stats["records"] += 1
                stats["labels"][label] = stats["labels"].get(label, 0) + 1
                stats["first"].setdefault(label, line)
        stats["lines"] = line
        if stats["error"]:
            writer.abort()
        else:
            stats["shard"] = writer.close()
            write_json_atomic(out / WORK / f"chunk-{task['index']:05d}.json", {"key": task["key"], "stats": stats})
    except BaseException:
        writer.abort()
        raise
    stats["peak"], stats["pid"] = peak_rss(), os.getpid()
    return stats


def worker_main() -> None:
    """A worker process (`python -m dh_mlx.train.prepare`): one JSON task a line on stdin, one JSON result a line
    on stdout, until stdin closes. Ctrl-C is left to the parent, which stops its workers."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        try:
            result = prepare_chunk(json.loads(line))
        except Exception as e:  # reported by the parent, which stops the run
            result = {"failed": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    worker_main()
