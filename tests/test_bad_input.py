"""More bad input, each one clear line and a non-zero exit, never a traceback: JSON nested thousands deep (in
JSONL and JSON files), a model folder whose weights file was cut short, a 1 GB line (read past, not into memory),
text that is not UTF-8 in a Parquet column, Parquet columns of the wrong type, a tokenizer without an EOS token and
a chat template that raises. CSV quoting (embedded newlines, quotes, commas) is not bad input: it must parse."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CHAT_TEMPLATE, build_tiny_llama, run_cli
from dpokit.cli import main
from dpokit.data.formats import load_pairs
from dpokit.data.sources import MAX_LINE_BYTES

GOOD = {"prompt": "Q", "chosen": " a", "rejected": " b"}


def one_error_line(argv, capsys) -> str:
    capsys.readouterr()  # what the set-up printed (saving the test model)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_json_nested_too_deeply_is_one_line_and_skippable(tmp_path, capsys):
    nested = "[" * 5000 + "]" * 5000
    good = json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"})
    lines = tmp_path / "nested.jsonl"
    lines.write_text(good + "\n" + '{"prompt": "a", "chosen": "b", "rejected": "c", "x": ' + nested + "}\n")
    assert "nested.jsonl:2: JSON nested too deeply to read" in one_error_line(["data", "inspect", str(lines)], capsys)
    main(["data", "inspect", str(lines), "--skip-invalid"])
    out = capsys.readouterr().out
    assert "1 pairs from 2 records" in out and "skipped 1 invalid records" in out
    whole = tmp_path / "nested.json"
    whole.write_text(nested)
    assert "nested.json: JSON nested too deeply to read" in one_error_line(["data", "inspect", str(whole)], capsys)


def test_a_truncated_weights_file_is_one_line(tmp_path, tokenizer, pairs_jsonl, capsys):
    model = tmp_path / "model"
    build_tiny_llama(model, vocab_size=len(tokenizer), tokenizer=tokenizer)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = one_error_line(["train", "--model", str(model), "--data", str(pairs_jsonl), "--max-steps", "1",
                          "--output", str(tmp_path / "run"), "--no-progress"], capsys)
    assert "a weights file is damaged or truncated" in err and "download the model again" in err
    shutil.rmtree(model)


def measured_cli(args: list[str], folder) -> tuple[int, str, str, float]:
    """`dpo ARGS` in a new process: (exit status, stdout, stderr, its peak RSS in MiB, from wait4)."""
    with (folder / "stdout").open("w") as out, (folder / "stderr").open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "dpokit", *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return (child.returncode, (folder / "stdout").read_text(), (folder / "stderr").read_text(),
            usage.ru_maxrss / 1024)


def test_a_1_gb_line_is_read_past_not_into_memory(tmp_path, capsys):
    """A sparse file (no disk used) whose second line is 1 GiB long: one line naming it, or skipped and counted
    under --skip-invalid, with the reading process's peak RSS far below the line's size."""
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as handle:
        handle.write(json.dumps(GOOD).encode() + b'\n{"prompt": "')
        handle.seek(1 << 30, os.SEEK_CUR)  # a hole: reads back as NUL bytes
        handle.write(b'"}\n' + json.dumps({**GOOD, "prompt": "Q2"}).encode() + b"\n")
    code, out, err, peak_mib = measured_cli(["data", "inspect", str(huge), "--skip-invalid"], tmp_path)
    assert code == 0, err
    assert "2 pairs from 3 records" in out and "skipped 1 invalid records" in out
    assert peak_mib < 600, peak_mib  # the interpreter and its imports take ~220 MiB; the line alone is 1024
    code, _, err = run_cli(["data", "inspect", str(huge)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"huge.jsonl:2: line longer than {MAX_LINE_BYTES >> 20} MiB" in err and "--skip-invalid" in err
    wide = tmp_path / "wide.csv"
    with wide.open("wb") as handle:
        handle.write(b"prompt,chosen,rejected\n")
        handle.seek(1 << 30, os.SEEK_CUR)
        handle.write(b",a,b\n")
    code, _, err = run_cli(["data", "inspect", str(wide)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "wide.csv: a line longer than" in err, err


def test_text_that_is_not_utf8_in_a_parquet_column_is_one_line_and_skippable(tmp_path, capsys):
    raw = pa.array([b" a", b"\xff\xfe"], type=pa.binary()).view(pa.string())  # bytes Arrow was told are text
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["Q", "Q2"], "chosen": raw, "rejected": [" b", " c"]}), path)
    code, _, err = run_cli(["data", "inspect", str(path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "bad.parquet:row 2: column 'chosen' is not UTF-8 text" in err
    code, out, _ = run_cli(["data", "inspect", str(path), "--skip-invalid"], capsys)
    assert code == 0 and "1 pairs from 2 records" in out and "skipped 1 invalid records" in out


@pytest.mark.parametrize("column, type_name", [
    (pa.array([1, 2], type=pa.int64()), "int64"),
    (pa.array([{"text": "a"}, {"text": "b"}]), "struct<text: string>"),
])
def test_a_parquet_column_of_the_wrong_type_is_one_line_naming_it(tmp_path, capsys, column, type_name):
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"prompt": ["Q", "Q2"], "chosen": column, "rejected": [" b", " c"]}), path)
    code, _, err = run_cli(["data", "inspect", str(path), "--skip-invalid"], capsys)  # not a record's fault
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"typed.parquet: column 'chosen' is {type_name}, but it must hold text" in err


def test_csv_fields_with_newlines_quotes_and_commas_survive(tmp_path, capsys):
    rows = [{"prompt": 'He said "hi",\nthen left.\r\n', "chosen": ' "quoted", two\n\nparagraphs', "rejected": ' ""'},
            {"prompt": "line\rreturn", "chosen": " a,b,c", "rejected": ' end "'}]
    path = tmp_path / "quoted.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    code, out, err = run_cli(["data", "inspect", str(path)], capsys)
    assert code == 0 and "2 pairs from 2 records" in out, err
    pairs, _ = load_pairs(str(path))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(r["prompt"], r["chosen"], r["rejected"])
                                                                    for r in rows]


def test_a_tokenizer_without_eos_is_one_line(tmp_path, pairs_jsonl, capsys):
    """Refused rather than worked around (see data.tokenization): a plain completion must end with the token the
    model stops on, or DPO never scores where it ends."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in pairs_jsonl.read_text().splitlines() for w in json.loads(line)["prompt"].split()}
                   | {w for line in pairs_jsonl.read_text().splitlines() for key in ("chosen", "rejected")
                      for w in json.loads(line)[key].split()})
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>",
                                        unk_token="<unk>")
    assert tokenizer.eos_token_id is None
    model = tmp_path / "no-eos"
    build_tiny_llama(model, vocab_size=len(vocab), tokenizer=tokenizer)
    capsys.readouterr()  # what saving the model printed
    code, _, err = run_cli(["train", "--model", str(model), "--data", str(pairs_jsonl), "--max-steps", "1",
                            "--no-cache", "--output", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"the tokenizer ({model}) has no EOS token" in err and "set eos_token" in err


def test_a_chat_template_that_raises_is_one_line_naming_it_and_the_record(tmp_path, tokenizer, capsys):
    model = tmp_path / "strict"
    strict = "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden " \
             "words, please') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE
    build_tiny_llama(model, vocab_size=len(tokenizer))
    saved = tokenizer.chat_template
    tokenizer.chat_template = strict
    try:
        tokenizer.save_pretrained(model)
    finally:
        tokenizer.chat_template = saved
    data = tmp_path / "chat.jsonl"
    records = [{"prompt": [{"role": "user", "content": text}], "chosen": [{"role": "assistant", "content": " a"}],
                "rejected": [{"role": "assistant", "content": " b"}]} for text in ("Hi", "Say a forbidden word")]
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    capsys.readouterr()
    code, _, err = run_cli(["train", "--model", str(model), "--data", str(data), "--max-steps", "1", "--no-cache",
                            "--eval-fraction", "0", "--output", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"the chat template of {model} refused the messages (user): no forbidden words, please" in err
    assert "in the record starting 'Say a forbidden word'" in err
