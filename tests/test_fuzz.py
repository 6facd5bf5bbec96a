"""Fuzzing the two doors user input comes through: data files (formats.load_pairs) and configuration (YAML files
and `dpo train` flags). Whatever hypothesis feeds them, the outcome is loaded data, a Config, or one clean
user error (DPOError, or argparse's usage error for flags), never another exception.

And the bad input that issue 19 lists, each with its own property: over-long lines (skipped and counted),
text that is not UTF-8 in Parquet, CSV quoting (values come back as written), Parquet columns of any type,
tokenizers with and without EOS, and chat templates that raise on some messages."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import string
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.config import FIELDS, Config
from dpokit.data import sources
from dpokit.data.tokenization import tokenize_pairs
from dpokit.errors import DPOError
from dpokit.data.formats import PreferencePair, load_pairs

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELD_NAMES = ["prompt", "chosen", "rejected", "responses", "scores", "completion", "label", "text", "messages",
               "role", "content", "score_chosen", "score_rejected", "margin"]
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": scalars}), max_size=3)
records = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6),
                          scalars | messages | st.lists(scalars, max_size=3), max_size=6)


def load_file(name: str, content: bytes, **options):
    """`load_pairs` on a temporary file; returns the pairs, or None for a clean DPOError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            pairs, report = load_pairs(str(path), **options)
        except DPOError as err:
            assert "\n" not in str(err).strip(), f"not one line: {err}"
            return None
    assert pairs and all(isinstance(p, PreferencePair) for p in pairs)
    assert report.pairs == len(pairs)
    return pairs


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["data.jsonl", "data.json", "data.parquet", "data.csv"]))
def test_random_bytes_are_loaded_or_refused_cleanly(content, name):
    load_file(name, content)


@FUZZ
@given(json_values)
def test_random_json_documents_are_loaded_or_refused_cleanly(document):
    load_file("data.json", json.dumps(document).encode())


@FUZZ
@given(st.lists(records, min_size=1, max_size=4), st.booleans(),
       st.sampled_from([None, "explicit", "implicit", "conversational", "ranked", "unpaired", "sft"]))
def test_random_records_are_loaded_or_refused_cleanly(rows, skip_invalid, format):
    content = "\n".join(json.dumps(row) for row in rows).encode()
    load_file("data.jsonl", content, skip_invalid=skip_invalid, format=format)


def test_a_valid_record_does_load():  # the property above must be able to succeed, not only refuse
    pairs = load_file("data.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode())
    assert pairs is not None and (pairs[0].chosen, pairs[0].rejected) == ("a", "b")


def config_from(argv: list[str]):
    try:
        return Config.from_args(argv)
    except DPOError as err:
        assert "\n" not in str(err).strip(), f"not one line: {err}"
    except SystemExit as exit:  # argparse's own usage error: one "dpo train: error: ..." line, status 2
        assert exit.code == 2
    return None


@FUZZ
@given(st.text(max_size=200))
def test_random_yaml_text_is_a_config_or_one_clean_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        config_from(["--config", str(path)])


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=6), json_values, max_size=4))
def test_random_yaml_settings_are_a_config_or_one_clean_error(settings_):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(settings_), encoding="utf-8")
        config_from(["--config", str(path)])


flags = st.sampled_from([f"--{name.replace('_', '-')}" for name in FIELDS] + ["--no-cache", "--resume", "-x"])
values = st.sampled_from(["0", "-1", "1", "2.5", "nan", "inf", "1e400", "", "yes", "sigmoid", "tiny"]) \
    | st.text(string.printable, max_size=8)


@FUZZ
@given(st.lists(flags | values, max_size=6))
def test_random_command_lines_are_a_config_or_one_clean_error(argv):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        config = config_from(argv)
    assert config is None or isinstance(config, Config)
    assert "Traceback" not in stderr.getvalue()


def test_a_valid_command_line_does_parse():
    assert config_from(["--lr", "0.001", "--resume"]).resume == "latest"


# ---- issue 19's bad input ------------------------------------------------------------------------------------

LIMIT = 64  # bytes: sources.MAX_LINE_BYTES for the line-length property, so lines cross it both ways


@FEW
@given(st.lists(st.tuples(st.text(string.ascii_letters + " ", min_size=1, max_size=12), st.integers(0, 60)),
                min_size=1, max_size=6))
def test_lines_over_the_limit_are_skipped_and_counted(rows):
    lines = [json.dumps({"prompt": "p" * pad, "chosen": " " + text, "rejected": " x"}) for text, pad in rows]
    long = sum(len(line) > LIMIT for line in lines)  # the limit leaves out the line break
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "MAX_LINE_BYTES", LIMIT)
        if long == len(lines):
            assert load_file("data.jsonl", "\n".join(lines).encode() + b"\n", skip_invalid=True) is None
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "data.jsonl"
            path.write_text("\n".join(lines) + "\n")
            pairs, report = load_pairs(str(path), skip_invalid=True)
    assert report.skipped_invalid == long and report.records == len(lines)
    assert [p.chosen for p in pairs] == [" " + text for (text, _), line in zip(rows, lines) if len(line) <= LIMIT]


texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
                | st.sampled_from(['"', ",", "\n", "\r", " "]), max_size=16)  # "\r\n" comes from "\r" then "\n"


@FEW
@given(st.lists(st.tuples(texts, texts.filter(str.strip), texts.filter(str.strip)), min_size=1, max_size=4))
def test_csv_values_with_quotes_and_line_breaks_come_back_as_written(rows):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["prompt", "chosen", "rejected"])
    writer.writerows(rows)
    pairs = load_file("data.csv", buffer.getvalue().encode("utf-8"))
    assert pairs is not None and [(p.prompt, p.chosen, p.rejected) for p in pairs] == rows


@FEW
@given(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=4), st.booleans())
def test_parquet_text_that_may_not_be_utf8_is_loaded_or_refused_per_row(chosen, skip_invalid):
    def valid(raw: bytes) -> bool:
        try:
            return bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            return False
    n = len(chosen)
    table = pa.table({"prompt": ["p"] * n, "chosen": pa.array(chosen, type=pa.binary()).view(pa.string()),
                      "rejected": [" r"] * n})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    pairs = load_file("data.parquet", buffer.getvalue(), skip_invalid=skip_invalid)
    good = [raw.decode() for raw in chosen if valid(raw)]
    assert (pairs is None) == (not good or (not skip_invalid and len(good) < n))
    if pairs is not None:
        assert [p.chosen for p in pairs] == good


arrow_columns = st.sampled_from([
    (pa.int64(), [1, 2]), (pa.float32(), [0.5, 1.0]), (pa.bool_(), [True, False]), (pa.binary(), [b"a", b"b"]),
    (pa.struct([("text", pa.string())]), [{"text": "a"}, {"text": "b"}]), (pa.string(), [" a", " b"]),
    (pa.large_string(), [" a", " b"]), (pa.null(), [None, None]), (pa.dictionary(pa.int8(), pa.string()), None),
    (pa.list_(pa.int64()), [[1], [2]]), (pa.timestamp("ms"), [0, 1]),
])


@FEW
@given(st.sampled_from(["prompt", "chosen", "rejected"]), arrow_columns)
def test_a_parquet_text_column_of_any_type_loads_or_is_one_line_naming_it(name, column):
    kind, values = column
    array = pa.array([" a", " b"]).dictionary_encode() if values is None else pa.array(values, type=kind)
    columns = {"prompt": pa.array(["p", "q"]), "chosen": pa.array([" c", " d"]), "rejected": pa.array([" e", " f"])}
    columns[name] = array
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "data.parquet"
            path.write_bytes(buffer.getvalue())
            load_pairs(str(path))
    except DPOError as err:
        assert "\n" not in str(err)
        if kind in (pa.int64(), pa.float32(), pa.bool_(), pa.binary(), pa.timestamp("ms")) or pa.types.is_struct(kind):
            assert f"column '{name}' is {array.type}" in str(err), err
        return
    assert pa.types.is_string(kind) or pa.types.is_large_string(kind) or values is None


plain_or_chat = st.builds(lambda text, chat: PreferencePair([{"role": "user", "content": "Q" + text}],
                                                            [{"role": "assistant", "content": " a" + text}],
                                                            [{"role": "assistant", "content": " b"}])
                          if chat else PreferencePair("Q" + text, " a" + text, " b"),
                          st.text(string.ascii_letters + " ?!", max_size=12), st.booleans())


@FEW
@given(st.lists(plain_or_chat, min_size=1, max_size=4), st.booleans(), st.sampled_from(["", "!", "?"]))
def test_tokenizers_without_eos_and_templates_that_raise_give_ids_or_one_line(tokenizer, pairs, eos, forbidden):
    """Without EOS, plain pairs are refused (their completions could not end) and chat pairs, which the template
    ends, are not; a template that raises on a character is one line, naming the messages' first words."""
    tok = copy.deepcopy(tokenizer)
    if not eos:
        tok.eos_token = None
    if forbidden:
        tok.chat_template = ("{% for m in messages %}{% if '" + forbidden + "' in m['content'] %}{{ raise_exception("
                             "'no " + forbidden + " here') }}{% endif %}{% endfor %}" + tokenizer.chat_template)
    chat = [isinstance(p.prompt, list) for p in pairs]
    raises = forbidden and any(c and forbidden in p.prompt[0]["content"] + p.chosen[0]["content"]
                               for p, c in zip(pairs, chat))
    try:
        tokenized, _ = tokenize_pairs(pairs, tok, max_length=10**6, workers=1)
    except DPOError as err:
        assert "\n" not in str(err)
        assert raises and f"no {forbidden} here" in str(err) and "in the record starting 'Q" in str(err) \
            or not eos and not all(chat) and "has no EOS token" in str(err), err
        return
    assert not raises and (eos or all(chat))
    for pair, is_chat in zip(tokenized, chat):
        if not is_chat:
            assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.eos_token_id
            assert pair.chosen_ids.count(tok.eos_token_id) == 1
