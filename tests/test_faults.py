"""Faults the run survives, each injected for real:

- the data-cache write failing (disk full) costs the cache, not the run; a truncated or foreign file where the
  data cache or the reference cache (--precompute-ref) should be is rebuilt with a warning;
- a read-only --output stops the run in one line before the model loads or the data is read;
- a full disk during the final model save: one `TrainingFailure` line, the checkpoints intact, exit 1, and the
  same command with --resume saves the model;
- SIGKILL in the middle of each file of a checkpoint write: the next resume takes the previous complete one;
- two runs started at once on the same data and cache folder both train on the right data.

(A full disk during a checkpoint write is in test_checkpoint.py.)"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dpokit import checkpoint, cli
from dpokit.config import Config
from dpokit.data import cache as data_cache
from dpokit.data import preparation
from dpokit.data.tokenization import TokenizedPair
from dpokit.reference import ModelReference, precompute_reference


def prepare(pairs_jsonl, tokenizer, cache_dir):
    settings = preparation.DataSettings.from_settings(Config(data=str(pairs_jsonl), eval_fraction=0.25).to_dict(),
                                                      unpaired=False, sft=False)
    return preparation.prepare(settings, tokenizer, cache=True, cache_dir=str(cache_dir))


def test_a_full_disk_during_the_data_cache_write_warns_and_goes_on_without_the_cache(
        pairs_jsonl, tokenizer, tmp_path, monkeypatch):
    def savez_until_full(path, **arrays):
        path.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    expected = prepare(pairs_jsonl, tokenizer, tmp_path / "healthy")        # the same data, cached normally
    monkeypatch.setattr(np, "savez", savez_until_full)
    data = prepare(pairs_jsonl, tokenizer, tmp_path / "full")
    warnings = [n for n in data.notes if n.startswith("warning:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "goes on without it" in warnings[0]
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in data.train] == \
        [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in expected.train]
    assert list((tmp_path / "full").iterdir()) == []                         # no partial file left behind


def test_a_truncated_or_foreign_cache_file_is_rebuilt_with_a_warning(pairs_jsonl, tokenizer, tmp_path):
    first = prepare(pairs_jsonl, tokenizer, tmp_path)
    (cached,) = tmp_path.glob("*.npz")
    whole = cached.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"PK\x03\x04 not a cache written by dpokit"):
        cached.write_bytes(damaged)
        again = prepare(pairs_jsonl, tokenizer, tmp_path)
        warnings = [n for n in again.notes if n.startswith("warning:")]
        assert len(warnings) == 1 and str(cached) in warnings[0] and "replacing it" in warnings[0]
        assert [p.chosen_ids for p in again.train] == [p.chosen_ids for p in first.train]
        assert data_cache.load(tmp_path, cached.stem) is not None            # replaced by a readable entry


class Unreachable:
    """A reference that must not be run (a usable cached table has to be read instead)."""

    def logps(self, batch):
        raise AssertionError("the reference was run although its log-probs were cached")


def test_a_truncated_or_foreign_reference_cache_file_is_recomputed_with_a_warning(tiny_model, tmp_path):
    rng = random.Random(0)
    ids = lambda k: [rng.randrange(3, tiny_model.config.vocab_size) for _ in range(k)]  # noqa: E731
    pairs = [TokenizedPair(ids(4), ids(3), ids(2)) for _ in range(5)]
    cache = tmp_path / "reference" / "key.safetensors"

    def table(reference, warnings):
        """The table, with the warnings said on the way (the notes on where it was cached or reused left out)."""
        keep = lambda line: warnings.append(line) if line.startswith("warning") else None  # noqa: E731
        return precompute_reference(reference, pairs, layout="packed", pad_id=0, batch_size=2, device="cpu",
                                    cache_file=cache, warn=keep).table

    first = table(ModelReference(tiny_model), warnings := [])
    assert warnings == [] and cache.is_file()
    whole = cache.read_bytes()
    short = precompute_reference(ModelReference(tiny_model), pairs[:2], layout="packed", pad_id=0, batch_size=2,
                                 device="cpu", cache_file=tmp_path / "short.safetensors").table
    for damaged, why in ((whole[: len(whole) // 2], "is unreadable"), (b"PK\x03\x04 not a table", "is unreadable"),
                         ((tmp_path / "short.safetensors").read_bytes(), "is not a table of these 5 pairs")):
        cache.write_bytes(damaged)
        again = table(ModelReference(tiny_model), warnings := [])
        assert len(warnings) == 1 and str(cache) in warnings[0] and why in warnings[0] and "replacing it" in warnings[0]
        assert all(torch.equal(again[name], first[name]) for name in first)
        reread = table(Unreachable(), warnings := [])                        # replaced by a usable table
        assert warnings == [] and all(torch.equal(reread[name], first[name]) for name in first)
    assert len(short["chosen"]) == 2


def train_as_nobody_if_root(argv):
    """`dpo train argv` in a forked child, as the user nobody when this is root (permission bits do not bind
    root); the exit status and every line it printed."""
    import dpokit.loop  # noqa: F401  (imported before the fork: nobody may not read this interpreter's files)

    read, write = os.pipe()
    child = os.fork()
    if child:
        os.close(write)
        with os.fdopen(read) as pipe:
            printed = pipe.read()
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), printed.strip().splitlines()
    try:
        os.close(read)
        sys.stdout = sys.stderr = os.fdopen(write, "w")
        if os.geteuid() == 0:
            os.setgid(65534), os.setuid(65534)
        cli.main(argv)
    except SystemExit as stop:
        sys.stdout.flush()
        os._exit(stop.code if isinstance(stop.code, int) else 1)
    finally:
        os._exit(0)


def test_a_read_only_output_folder_is_one_line_before_the_model_or_the_data_is_touched():
    top = Path(tempfile.mkdtemp())  # world-traversable, unlike pytest's tmp_path, so that nobody reaches it
    try:
        top.chmod(0o755)
        read_only = top / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        for output in (read_only, read_only / "run"):
            # A missing model and data file: had either been touched first, the error would name them instead.
            code, lines = train_as_nobody_if_root(["train", "--model", str(top / "no-model"), "--data",
                                                   str(top / "no-data.jsonl"), "--output", str(output),
                                                   "--no-progress"])
            assert code == 2 and lines == [f"dpo train: error: --output {output}: cannot write into {read_only} "
                                           "(Permission denied); choose another --output, or make that folder "
                                           "writable"]
        assert list(read_only.iterdir()) == []
    finally:
        shutil.rmtree(top)


def test_a_full_disk_during_the_final_save_is_one_line_keeps_the_checkpoints_and_resume_saves_it(
        tiny_model_dir, pairs_jsonl, tmp_path, monkeypatch, capsys, one_thread):
    import transformers.modeling_utils

    output = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--max-steps", "3",
            "--batch-size", "4", "--eval-fraction", "0", "--save-every", "2", "--no-progress", "--no-cache",
            "--report-to", "none", "--output", str(output)]

    def save_until_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_until_full)
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [f"dpo train: error: could not save the trained model to {output / 'model'}: No space left on "
                      f"device (the half-written folder was removed); the checkpoints are intact (newest "
                      f"{output / 'checkpoints' / 'step-3'}): free disk space, then run the same command with "
                      "--resume to save the model from it"]
    assert not (output / "model").exists()
    assert [p.name for p in checkpoint.complete_checkpoints(output / "checkpoints")] == ["step-3", "step-2"]

    monkeypatch.undo()                                                       # space freed
    cli.main([*argv, "--resume"])
    saved = load_file(next((output / "model").glob("*.safetensors")))
    trained = load_file(output / "checkpoints" / "step-3" / checkpoint.MODEL)
    assert all(torch.equal(saved[name], trained[name]) for name in trained)


def test_a_full_disk_after_the_model_is_saved_is_one_line_that_says_the_model_is_there(
        tiny_model_dir, pairs_jsonl, tmp_path, monkeypatch, capsys, one_thread):
    from dpokit import model_card

    def write_until_full(model_dir, info):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_card, "write_card", write_until_full)
    output = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        cli.main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--max-steps", "1",
                  "--batch-size", "4", "--eval-fraction", "0", "--no-progress", "--no-cache", "--report-to", "none",
                  "--output", str(output)])
    assert stopped.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"the model is saved in {output / 'model'}" in errors[0]
    assert "No space left on device" in errors[0] and any((output / "model").glob("*.safetensors"))


KILL_POINTS = (checkpoint.MODEL, checkpoint.OPTIMIZER, checkpoint.TRAINER, checkpoint.METRICS, checkpoint.MARKER,
               "rename", "rotation")


def save_step(root, step, metrics):
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    return checkpoint.save(root, step, weights=checkpoint.trainable_state(model), optimizer={"step": step},
                           trainer={"step": step}, metrics=metrics, keep=1)


def save_killed_at(root, step, metrics, at):
    """Save checkpoint `step` in a forked child that SIGKILLs itself half-way through writing file `at` (its
    bytes cut in half first), just before the folder's rename, or just after it, before the rotation."""
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        return status
    try:
        real_torch_save, real_fsync, real_rename, real_rmtree = (checkpoint._torch_save, checkpoint._fsync,
                                                                 os.rename, shutil.rmtree)

        def die_half_written(path):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        def torch_save(obj, path):
            real_torch_save(obj, path)
            if path.name == at:
                die_half_written(path)

        def fsync(path):  # called right after the weights, metrics and marker are written
            if path.name == at:
                die_half_written(path)
            real_fsync(path)

        def rename(source, target):
            if at == "rename":
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(source, target)

        def rmtree(path, *args, **kwargs):
            if at == "rotation" and Path(path).name != Path(path).name.lstrip("."):
                return real_rmtree(path, *args, **kwargs)
            if at == "rotation":
                os.kill(os.getpid(), signal.SIGKILL)
            real_rmtree(path, *args, **kwargs)

        checkpoint._torch_save, checkpoint._fsync, os.rename, shutil.rmtree = torch_save, fsync, rename, rmtree
        save_step(root, step, metrics)
    finally:
        os._exit(3)  # never back into pytest in the child: reaching here means no kill happened


@pytest.mark.parametrize("at", KILL_POINTS)
def test_sigkill_at_each_file_of_a_checkpoint_write_resumes_from_the_previous_complete_one(tmp_path, at):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n' * 50)
    root = tmp_path / "checkpoints"
    save_step(root, 1, metrics)
    status = save_killed_at(root, 2, metrics, at)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    warnings: list[str] = []
    loaded = checkpoint.load("latest", tmp_path, warn=warnings.append)
    expected = 2 if at == "rotation" else 1                                 # renamed: step-2 is complete
    assert loaded.path.name == f"step-{expected}" and warnings == []
    torch.manual_seed(expected)
    assert torch.equal(loaded.weights["weight"], torch.nn.Linear(3, 2).weight.detach())
    save_step(root, 3, metrics)                                              # the resumed run's next save
    assert sorted(p.name for p in root.iterdir()) == ["step-3"]              # no half-written folder left


def test_two_runs_started_at_once_on_the_same_data_and_cache_both_train_on_the_right_data(
        tiny_model_dir, pairs_jsonl, tmp_path, one_thread):
    from dpokit.loop import train

    def argv(output, *extra):
        return ["--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--max-steps", "1", "--batch-size", "4",
                "--eval-fraction", "0", "--precompute-ref", "--no-progress", "--report-to", "none", "--output", str(output), *extra]

    train(Config.from_args(argv(tmp_path / "alone", "--no-cache")))
    shared = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "dpokit", "train", *argv(tmp_path / name, "--cache-dir",
                                                                             str(shared))],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for name in ("first", "second")]
    for run in runs:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0, out
        assert "warning" not in out, out
    alone = load_file(tmp_path / "alone" / "model" / "model.safetensors")
    for name in ("first", "second"):
        got = load_file(tmp_path / name / "model" / "model.safetensors")
        assert all(torch.equal(got[key], alone[key]) for key in alone)
    cached = sorted(p.relative_to(shared).as_posix() for p in shared.rglob("*") if p.is_file())
    assert len(cached) == 2 and cached[0].endswith(".npz") and cached[1].startswith("reference/"), cached
    assert data_cache.load(shared, Path(cached[0]).stem) is not None
