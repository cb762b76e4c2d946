"""Training a SentencePiece BPE tokenizer on the texts of domain-tagged JSONL files (`dh-mlx tokenizer train`)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterator

import sentencepiece as spm

from ..outputs import check_output_dir
from ..files import write_atomic
from ..tokenizer import _SPACE_MARK, BOS, EOS, MODEL_FILE, PAD, UNK, Tokenizer, TokenizerError, write_hf_files
from .data import read_jsonl, record_texts

# The trainer drops longer sentences; our chunks stay below it.
_MAX_SENTENCE_BYTES = 16384
_CHUNK_CHARS = 4000

def _chunks(text: str) -> Iterator[str]:
    """Line-aligned pieces of at most ~_CHUNK_CHARS characters (the trainer's unit is a 'sentence')."""
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > _CHUNK_CHARS:
            yield line[:_CHUNK_CHARS]
            line = line[_CHUNK_CHARS:]
        if size + len(line) > _CHUNK_CHARS and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def _training_sentences(paths: list[Path], errors: list[Exception]) -> Iterator[str]:
    try:
        for path in paths:
            for record in read_jsonl(path):
                for text in record_texts(record):
                    yield from _chunks(text.replace(_SPACE_MARK, " "))
    except Exception as e:  # the trainer reports it as its own RuntimeError; we re-raise the original
        errors.append(e)
        raise


def train_tokenizer(data: list[Path] | Path, out_dir: Path, *, vocab_size: int = 8192, seed: int = 0,
                    force: bool = False) -> Tokenizer:
    """Train a byte-fallback BPE model on the texts of JSONL files (or directories of them) into `out_dir`.

    Writes `tokenizer.model` (SentencePiece), `tokenizer_config.json`, `special_tokens_map.json` and, when the
    `tokenizers` package is installed, `tokenizer.json`. The text is streamed, never loaded whole.
    """
    paths = [Path(p) for p in (data if isinstance(data, (list, tuple)) else [data])]
    if not paths:
        raise TokenizerError("no training data given")
    minimum = 4 + 256 + 1  # specials, the 256 byte pieces, at least one learned piece
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise TokenizerError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise TokenizerError(f"vocab_size must be an integer >= {minimum}, got {vocab_size!r}")
    out_dir = check_output_dir(out_dir, inputs=paths, force=force)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    errors: list[Exception] = []
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(paths, errors), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=_MAX_SENTENCE_BYTES,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
            input_sentence_size=5_000_000, shuffle_input_sentence=True,  # a seeded sample of a huge corpus
            num_threads=1, minloglevel=2)
    except RuntimeError as e:
        if errors:
            raise errors[0] from None
        reason = str(e).strip().splitlines()[-1]
        if m := re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason):
            reason = (f"vocab_size {vocab_size} is too small: this corpus's characters and the 256 byte pieces "
                      f"need at least {m[1]}")
        elif m := re.search(r"Vocabulary size too high.*<= (\d+)", reason):
            reason = f"vocab_size {vocab_size} is too large: this corpus supports at most {m[1]}"
        elif "sentences_.empty()" in reason:
            reason = "the training data holds no text"
        raise TokenizerError(f"{', '.join(map(str, paths))}: tokenizer training failed: {reason}") from None
    write_atomic(out_dir / MODEL_FILE, model.getvalue())
    tokenizer = Tokenizer(out_dir / MODEL_FILE)
    write_hf_files(tokenizer, out_dir)
    return tokenizer
