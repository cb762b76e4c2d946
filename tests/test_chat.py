"""Chat through the CLI on a model whose tokenizer is a tokenizer.json (no tokenizer.model): `generate --chat`
applies the chat template, and `dh-mlx chat` keeps its KV cache between turns."""

import re

import pytest

from dh_mlx import load, random_model, save_model
from dh_mlx.chat import messages
from helpers import cli as run_cli, make_config


def cli(*args, stdin=""):  # an empty stdin: chat reads its turns from it
    return run_cli(*args, stdin=stdin)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("hf-model")
    save_model(random_model(make_config(vocab_size=416), seed=0), d)
    for f in tokenizer_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def prompt_tokens(stderr: str) -> list[int]:
    return [int(n) for n in re.findall(r"prompt: (\d+) tokens", stderr)]


def test_load_reads_the_tokenizer_json_and_its_eos_ids(model_dir):
    _, tok = load(model_dir)
    assert type(tok).__name__ == "HFTokenizer" and tok.eos_ids == (1, 401)


@pytest.mark.slow
def test_generate_chat_applies_the_template_with_the_system_message(model_dir):
    _, tok = load(model_dir)
    want = len(tok.encode_chat(messages("What is 2 + 2?", "Be brief.")))
    r = cli("generate", "--model", str(model_dir), "--prompt", "What is 2 + 2?", "--chat", "--system", "Be brief.",
            "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert prompt_tokens(r.stderr) == [want] and want > len(tok.encode("What is 2 + 2?")) + 3
    assert cli("generate", "--model", str(model_dir), "--prompt", "hi", "--system", "x").returncode == 1


@pytest.mark.slow
@pytest.mark.parametrize("mtp", ["--mtp", "--no-mtp"])
def test_chat_turns_reuse_the_kv_cache(model_dir, mtp):
    """Turn 2 prefills only what the cache does not hold: the tokens of the conversation so far that are not a
    prefix of it (the model has an MTP module; with it on, its cache is caught up instead of prefilled again)."""
    from dh_mlx.generation.chat import Conversation
    turns = ["Hello there", "And again, once more"]
    r = cli("chat", "--model", str(model_dir), "--max-tokens", "6", "--system", "Be brief.", mtp,
            stdin=f"{turns[0]}\n\n{turns[1]}\n")
    assert r.returncode == 0, r.stderr
    m, tok = load(model_dir)
    assert m.config.num_nextn_predict_layers == 1
    conversation = Conversation(m, tok, system="Be brief.")
    first = len(tok.encode_chat(conversation.messages + [{"role": "user", "content": turns[0]}]))
    "".join(piece.text for piece in conversation.reply(turns[0], max_tokens=6, mtp=False))
    held = conversation.cache.tokens
    second = tok.encode_chat(conversation.messages + [{"role": "user", "content": turns[1]}])
    common = next(i for i, (a, b) in enumerate(zip(held + [None], second)) if a != b)
    assert 0 < len(second) - common < len(second) - first  # the first turn is not run again
    assert prompt_tokens(r.stderr) == [first, len(second) - common]  # the blank line is no turn


def test_exports_keep_the_tokenizer_json_and_its_eos_ids(model_dir, tmp_path):
    from dh_mlx.convert import export_gguf, export_hf
    from dh_mlx.tokenizer import load_tokenizer
    export_hf(model_dir, tmp_path / "hf")
    ours, exported = load_tokenizer(model_dir), load_tokenizer(tmp_path / "hf")
    assert exported.encode("a special token <｜User｜> ½") == ours.encode("a special token <｜User｜> ½")
    assert exported.eos_ids == (1, 401)
    gguf = pytest.importorskip("gguf")
    export_gguf(model_dir, tmp_path / "m.gguf", outtype="f32")  # its vocabulary as llama.cpp's gpt2 tokenizer
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.model"].contents() == "gpt2"


@pytest.mark.slow
def test_lora_on_a_tokenizer_json_model_lowers_its_loss(model_dir, tmp_path):
    import json as _json

    from dh_mlx.train.lora_run import lora
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}."}]}
            for w in ("apple", "river", "stone", "cloud") * 30]
    (tmp_path / "chat.jsonl").write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    result = lora(model=model_dir, data=tmp_path / "chat.jsonl", out=tmp_path / "run", rank=4, steps=12,
                  batch_size=4, seq_len=32, eval_every=12, lr=1e-2, progress=False)
    assert result.val_loss < result.val_loss_before - 0.1


@pytest.mark.slow
def test_chat_training_data_goes_through_the_models_own_template(tokenizer_dir, tmp_path):  # noqa: F811
    """A `messages` record for a tokenizer.json model: the ids transformers' apply_chat_template gives, and only
    the tokens each reply adds (its text and the template's end of turn) trained."""
    import json as _json

    import transformers

    from dh_mlx.tokenizer import load_tokenizer
    from dh_mlx.train.data import read_jsonl, tokenize
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
             {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
             {"role": "assistant", "content": "6 🙂"}]
    (tmp_path / "d.jsonl").write_text(_json.dumps({"messages": turns}) + "\n")
    tok = load_tokenizer(tokenizer_dir)
    doc = tokenize(next(read_jsonl(tmp_path / "d.jsonl")), tok)
    want = transformers.AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        turns, tokenize=True, return_dict=True)["input_ids"]
    assert doc.ids.tolist() == list(want)
    trained = tok.tk.decode(doc.ids[doc.train].tolist(), skip_special_tokens=False)
    assert trained == "4.<｜end▁of▁sentence｜>6 🙂<｜end▁of▁sentence｜>"
