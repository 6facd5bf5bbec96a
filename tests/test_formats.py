"""Formats room: detection, every record schema, every source type, and one error per malformed-record kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.errors import DPOError
from dpokit.data.formats import PreferencePair, detect_format, load_pairs, mismatch_partners, to_unpaired

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("name, fmt, count", [
    ("hh_rlhf", "implicit", 6), ("ultrafeedback", "conversational", 4), ("chat_messages", "conversational", 4),
    ("ranked", "ranked", 3), ("kto", "unpaired", 5), ("sft", "sft", 4)])
def test_example_files_are_detected(name, fmt, count):
    pairs, report = load_pairs(str(EXAMPLES / f"{name}.jsonl"))
    assert (report.format, report.pairs, len(pairs)) == (fmt, count, count)
    assert report.skipped_invalid == report.identical_pairs == 0


def test_hh_prompt_is_the_shared_prefix_up_to_the_last_shared_assistant_turn():
    pairs, _ = load_pairs(str(EXAMPLES / "hh_rlhf.jsonl"))
    multi = pairs[1]
    assert multi.prompt == ("\n\nHuman: Can you help me write a poem about the sea?\n\nAssistant: Of course! What mood "
                            "would you like?\n\nHuman: Something calm.\n\nAssistant:")
    assert multi.rejected == " The sea is big. It has water."
    # Chosen and rejected share " " after the last turn marker and "Of course!" earlier: the cut is at the marker.
    assert pairs[3].prompt.endswith("\n\nAssistant:") and pairs[3].chosen == " A spider has eight legs."
    assert pairs[4].chosen == " Спасибо, хорошо! Чем могу помочь?"


def test_ultrafeedback_full_conversations_split_after_shared_turns():
    pairs, _ = load_pairs(str(EXAMPLES / "ultrafeedback.jsonl"))
    multi = pairs[2]
    assert [m["content"] for m in multi.prompt] == ["Give me a word that rhymes with cat.", "Hat.", "Another one?"]
    assert multi.chosen == [{"role": "assistant", "content": "Mat, or bat."}]
    assert multi.rejected == [{"role": "assistant", "content": "Dog."}]
    assert multi.extras == {"score_chosen": 7.0, "score_rejected": 1.0}


def test_conversational_prompt_string_with_assistant_only_completions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello"}],
                                               "rejected": [{"role": "assistant", "content": "No"}], "margin": 2}])
    (pair,), _ = load_pairs(str(path))
    assert pair.prompt == [{"role": "user", "content": "Hi?"}] and pair.extras == {"margin": 2.0}


@pytest.mark.parametrize("mode, expected", [
    ("best-worst", [(" The capital of France is Paris.", " I don't know.")]),
    ("adjacent", [(" The capital of France is Paris.", " Paris."), (" Paris.", " Lyon."), (" Lyon.", " I don't know.")]),
    ("all", [(a, b) for k, a in enumerate([" The capital of France is Paris.", " Paris.", " Lyon.", " I don't know."])
             for b in [" The capital of France is Paris.", " Paris.", " Lyon.", " I don't know."][k + 1:]]),
])
def test_ranked_pairs(mode, expected):
    pairs, _ = load_pairs(str(EXAMPLES / "ranked.jsonl"), pairs=mode)
    first = [p for p in pairs if p.group == 0]
    assert [(p.chosen, p.rejected) for p in first] == expected
    assert all(p.extras["score_chosen"] > p.extras["score_rejected"] for p in first)
    assert len({p.group for p in pairs}) == 3


def test_ranking_field_means_rank_one_is_best():
    pairs, _ = load_pairs(str(EXAMPLES / "ranked.jsonl"), pairs="adjacent")
    rhymes = [(p.chosen, p.rejected) for p in pairs if p.group == 1]
    assert rhymes == [(" Hat.", " Mat."), (" Mat.", " Dog.")]


def test_unpaired_examples_get_labels_and_a_mismatched_completion():
    pairs, _ = load_pairs(str(EXAMPLES / "kto.jsonl"), seed=3)
    records = [json.loads(line) for line in (EXAMPLES / "kto.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p.chosen for p in pairs] == [r["completion"] for r in records]
    assert [p.extras["label"] for p in pairs] == [float(r["label"]) for r in records]
    completions = [r["completion"] for r in records]
    # Each example's mismatched completion is another example's (all distinct here), each used exactly once.
    assert sorted(p.rejected for p in pairs) == sorted(completions)
    assert all(p.rejected != p.chosen for p in pairs)


def test_mismatch_partners_is_a_derangement_and_seeded():
    for n in (2, 3, 10, 57):
        partner = mismatch_partners(n, seed=n)
        assert sorted(partner) == list(range(n)) and all(partner[i] != i for i in range(n))
        assert partner == mismatch_partners(n, seed=n)


def test_paired_data_becomes_two_labelled_examples_per_pair():
    pairs = [PreferencePair(f"p{i}", f"good{i}", f"bad{i}") for i in range(4)]
    examples = to_unpaired(pairs, seed=0)
    assert [(e.prompt, e.chosen, e.extras["label"]) for e in examples] == [
        (f"p{i}", text, label) for i in range(4) for text, label in ((f"good{i}", 1.0), (f"bad{i}", 0.0))]
    assert all(e.rejected != e.chosen for e in examples)
    assert [e.group for e in examples] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_sft_text_only_has_an_empty_prompt(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world."}, {"text": "Café au lait."}])
    pairs, report = load_pairs(str(path))
    assert report.format == "sft"
    assert pairs[1] == PreferencePair("", "Café au lait.", "Café au lait.")


def test_columns_remap_and_forced_format(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "good": " yes", "bad": " no", "id": 1}])
    (pair,), report = load_pairs(str(path), columns="prompt=question,chosen=good,rejected=bad", format="explicit")
    assert (pair.prompt, pair.chosen, pair.rejected, report.format) == ("Q?", " yes", " no", "explicit")
    with pytest.raises(DPOError, match="--columns"):
        load_pairs(str(path), columns="prompt")


def test_all_source_types_give_the_same_pairs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}: ¿qué?", "chosen": f" sí {i}", "rejected": f" no {i}", "score_chosen": i} for i in range(5)]
    expected, _ = load_pairs(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    (tmp_path / "a.json").write_text(json.dumps({"train": rows}), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    with (tmp_path / "a.csv").open("w", encoding="utf-8", newline="") as handle:
        import csv

        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", rows[:2])
    write_jsonl(folder / "part-1.jsonl", rows[2:])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("a.json", "a.parquet", "a.csv", "folder", "saved"):
        pairs, _ = load_pairs(str(tmp_path / source))
        assert pairs == expected, source
    with pytest.raises(DPOError, match="no split 'test'"):
        load_pairs(str(tmp_path / "saved"), split="test")


def test_max_pairs_and_identical_pairs_are_reported(tmp_path):
    rows = [{"prompt": "P", "chosen": " same", "rejected": " same"}] + [{"prompt": "P", "chosen": " a", "rejected": " b"}] * 4
    pairs, report = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows)), max_pairs=3)
    assert len(pairs) == 3 and report.identical_pairs == 1
    assert any("chosen identical to rejected" in line for line in report.lines())


BAD_RECORDS = [
    ('{"prompt": "P", "chosen": " a", "rejected": " b"', ":2: malformed JSON"),
    ('["a", "b"]', ":2: expected a JSON object"),
    ({"prompt": "P", "chosen": " a"}, ":2: field 'rejected' is missing"),
    ({"prompt": "P", "chosen": 3, "rejected": " b"}, ":2: field 'chosen' must be a string, got int"),
    ({"prompt": "P", "chosen": "  ", "rejected": " b"}, ":2: field 'chosen' is empty"),
    ({"prompt": "P", "chosen": " a", "rejected": " b", "margin": "wide"}, ":2: field 'margin' must be a number"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_malformed_record_names_file_line_and_field(tmp_path, bad, message):
    good = {"prompt": "P", "chosen": " a", "rejected": " b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, good])
    with pytest.raises(DPOError) as err:
        load_pairs(str(path))
    assert f"{path}{message}" in str(err.value)
    if "JSON" not in message:  # record-level problems can be skipped; broken syntax cannot
        pairs, report = load_pairs(str(path), skip_invalid=True)
        assert (len(pairs), report.skipped_invalid) == (2, 1)


@pytest.mark.parametrize("first, bad, message", [
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
     {"chosen": "Human: x", "rejected": "Human: y"}, "share no '\\n\\nAssistant:' turn"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     {"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "field 'prompt', message 0: expected"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]},
     {"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "field 'scores' must be a list with one entry per"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]},
     {"prompt": "p", "responses": ["a", "b"], "scores": [1, 1]}, "all responses score the same"),
    ({"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": "maybe"},
     "field 'label' must be true or false"),
])
def test_malformed_records_of_each_format(tmp_path, first, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [first, bad])
    with pytest.raises(DPOError, match=f"^{path}:2: .*" + message.replace("\\", "\\\\").replace("(", "\\(")
                       .replace("[", "\\[")):
        load_pairs(str(path))


def test_source_errors(tmp_path):
    with pytest.raises(DPOError, match="file not found"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DPOError, match="unsupported file type .txt"):
        load_pairs(str(tmp_path / "d.txt"))
    with pytest.raises(DPOError, match="cannot tell the data format"):
        detect_format({"question": "q", "answer": "a"}, "d.jsonl:1")
    (tmp_path / "bad.csv").write_bytes(b"prompt,chosen,rejected\n\xff\xfe,a,b\n")
    with pytest.raises(DPOError, match="not UTF-8"):
        load_pairs(str(tmp_path / "bad.csv"))
