"""SFT's token accuracy (TRL's `mean_token_accuracy`): the argmax hits counted inside the chunked LM-head pass equal
an argmax over full logits, cost no head matmul of their own, and reach metrics.jsonl of an SFT run only."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpokit.batching import make_batch
from dpokit.config import Config
from dpokit.data.tokenization import TokenizedPair
from dpokit.distributed import Dist
from dpokit.logprobs import PairLogps, SequenceScorer, chunked_target_logps, sequence_logps
from dpokit.losses import LossOutput
from dpokit.metrics import MetricMeter
from dpokit.objective import Objective

from conftest import run_cli
from test_run_output import EXAMPLES

TOKENS, HIDDEN, VOCAB = 13, 16, 50


class HeadMatmuls(TorchDispatchMode):
    """Counts the matmuls whose output has a vocabulary-wide last dimension (the LM head's)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and out.shape[-1] == VOCAB:
            self.count += 1
        return out


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("fused", [True, False])
def test_hits_equal_the_argmax_of_full_logits_from_the_same_head_pass(softcap, fused):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator, requires_grad=True)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    logits = hidden.detach() @ head.weight.detach().T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    # Every other target is the argmax (a hit by construction), the rest random.
    targets = torch.where(torch.arange(TOKENS) % 2 == 0, logits.argmax(-1),
                          torch.randint(0, VOCAB, (TOKENS,), generator=generator))
    want = (logits.argmax(-1) == targets).float()
    module = head if fused else torch.nn.Sequential(head)   # the linear head's Function, or the checkpointed path
    with torch.no_grad(), HeadMatmuls() as plain:
        chunked_target_logps(hidden, module, targets, 4, softcap)
    with torch.no_grad(), HeadMatmuls() as counted:
        _, _, correct = chunked_target_logps(hidden, module, targets, 4, softcap, with_accuracy=True)
    assert correct is not None and torch.equal(correct, want) and want[::2].all()
    assert counted.count == plain.count == 4                  # one head matmul per chunk, with or without the count
    logps, _, correct = chunked_target_logps(hidden, module, targets, 4, softcap, with_accuracy=True)
    logps.sum().backward()                                     # the count rides along without a gradient
    assert torch.equal(correct, want) and hidden.grad is not None


@pytest.mark.parametrize("layout", ["blocks", "concatenated"])
def test_chosen_hits_equal_full_logits_argmax_on_a_tiny_llama(tiny_model, layout):
    """Completions that start with the model's greedy continuation (hits by construction) and go on with random
    tokens: per chosen completion, the hits counted in chunks of 3 equal the argmax of the full logits of
    prompt + completion compared with the completion's tokens."""
    model, rng = tiny_model, random.Random(0)
    vocab = model.config.vocab_size
    random_ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731

    def greedy(prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    def naive_hits(prompt: list[int], completion: list[int]) -> float:
        ids = torch.tensor([prompt + completion])
        predicted = model(input_ids=ids).logits[0, len(prompt) - 1:-1].argmax(-1)
        return float((predicted == ids[0, len(prompt):]).sum())

    with torch.no_grad():
        pairs = []
        for k in range(4):
            prompt = random_ids(4 + k)
            pairs.append(TokenizedPair(prompt, greedy(prompt, 3) + random_ids(2 + k), random_ids(5)))
        want = torch.tensor([naive_hits(p.prompt_ids, p.chosen_ids) for p in pairs])
    got = sequence_logps(SequenceScorer(model, chunk_size=3), make_batch(pairs, layout=layout, pad_id=0),
                         with_accuracy=True)
    assert got.chosen_correct is not None and torch.equal(got.chosen_correct, want) and (want >= 3).all()
    got.chosen.sum().backward()                                # training: log-probs keep their gradient


def test_the_meter_logs_hits_per_token_over_every_micro_batch_since_the_last_row():
    meter = MetricMeter(torch.device("cpu"))
    for hits, lengths in (([3.0, 1.0], [4.0, 4.0]), ([0.0], [2.0])):   # 4 of 8 tokens, then 0 of 2: 4 of 10
        n = len(hits)
        policy = PairLogps(-torch.ones(n), -torch.ones(n), torch.tensor(lengths), torch.tensor(lengths),
                           chosen_correct=torch.tensor(hits))
        out = LossOutput(torch.ones(n), torch.zeros(n), torch.zeros(n), has_rewards=False)
        meter.add(out.losses, policy, [out], tokens=10)
    row = meter.reduce(Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert row["mean_token_accuracy"] == pytest.approx(4 / 10)
    assert not any(name.startswith("mean_token_accuracy/") for name in row)


def test_only_runs_with_an_sft_term_count_hits():
    assert Objective.from_config(Config(loss="sft")).token_accuracy
    assert Objective.from_config(Config(loss="sigmoid", rpo_alpha=0.5)).token_accuracy   # RPO's NLL term
    assert not Objective.from_config(Config(loss="sigmoid")).token_accuracy


def test_an_sft_run_writes_mean_token_accuracy_to_metrics_jsonl(tiny_model_dir, tmp_path, capsys):
    output = tmp_path / "sft"
    code, out, err = run_cli(["sft", "--model", str(tiny_model_dir), "--data", str(EXAMPLES / "sft.jsonl"),
                              "--batch-size", "2", "--max-steps", "2", "--eval-fraction", "0.25", "--output",
                              str(output), "--report-to", "none", "--no-progress", "--no-cache"], capsys)
    assert code == 0, out + err
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [row for row in rows if "loss" in row]
    evals = [row for row in rows if "eval/loss" in row]
    assert len(train) == 2 and evals
    assert all(0 <= row["mean_token_accuracy"] <= 1 for row in train)
    assert 0 <= evals[-1]["eval/mean_token_accuracy"] <= 1
