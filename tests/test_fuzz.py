"""Fuzzing the two doors user input comes through: data files (formats.load_pairs) and configuration (YAML files
and `dpo train` flags). Whatever hypothesis feeds them, the outcome is loaded data, a Config, or one clean
user error (DPOError, or argparse's usage error for flags), never another exception."""

from __future__ import annotations

import contextlib
import io
import json
import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpokit.config import FIELDS, Config
from dpokit.errors import DPOError
from dpokit.data.formats import PreferencePair, load_pairs

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

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
