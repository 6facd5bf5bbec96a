"""TPO / TPO-L (arXiv 2405.16681): the loss against the paper's formula by hand, the gold column from data to
batch (explicit and conversational, the exact boundary, the cache), the gold log-prob against a naive full-logits
forward in every layout, and `dpo train --loss tpo` through the real CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from dpokit import losses, models, report
from dpokit.batching import LAYOUTS, make_batch
from dpokit.data import cache as data_cache, formats, tokenization
from dpokit.errors import DPOError
from dpokit.logprobs import PairLogps, SequenceScorer, naive_sequence_logps
from dpokit.losses.triple import GOLD_LENGTHS, GOLD_LOGPS
from dpokit.objective import gold_logps


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _inputs():
    policy = PairLogps(chosen=torch.tensor([-4.0, -10.0]), rejected=torch.tensor([-6.0, -9.0]),
                       chosen_lengths=torch.tensor([2.0, 5.0]), rejected_lengths=torch.tensor([3.0, 3.0]))
    extras = {GOLD_LOGPS: torch.tensor([-3.0, -5.0]), GOLD_LENGTHS: torch.tensor([2.0, 3.0])}
    return policy, extras


def test_tpo_is_the_papers_formula_by_hand():
    """L = -log s(beta (log pi(y_w) - log pi(y_l))) + alpha NLL(y_g), NLL per gold token over the batch:
    gold tokens 2 + 3, log-probs -3 - 5, so NLL = 8/5; beta 0.5: z = 0.5 * (-4 + 6) = 1 and 0.5 * (-10 + 9) = -0.5,
    -log s(z) = softplus(-z)."""
    policy, extras = _inputs()
    out = losses.get("tpo").function(policy, None, extras, beta=0.5, label_smoothing=0.0, tpo_alpha=0.5)
    expected = [_softplus(-1.0) + 0.5 * 1.6, _softplus(0.5) + 0.5 * 1.6]
    torch.testing.assert_close(out.losses, torch.tensor(expected))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-2.0, -5.0]))
    assert out.metrics["gold_nll"].item() == pytest.approx(1.6)
    # cDPO smoothing e = 0.1 on the contrastive term: (1 - e) softplus(-z) + e softplus(z)
    smoothed = losses.get("tpo").function(policy, None, extras, beta=0.5, label_smoothing=0.1, tpo_alpha=0.0)
    torch.testing.assert_close(smoothed.losses, torch.tensor([0.9 * _softplus(-1.0) + 0.1 * _softplus(1.0),
                                                             0.9 * _softplus(0.5) + 0.1 * _softplus(-0.5)]))


def test_tpo_l_is_the_papers_formula_by_hand():
    """L = -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma) + alpha NLL(y_g): averages -4/2 = -2 vs
    -6/3 = -2 and -10/5 = -2 vs -9/3 = -3; beta 0.5, gamma 0.25: z = -0.25 and 0.25."""
    policy, extras = _inputs()
    out = losses.get("tpo-l").function(policy, None, extras, beta=0.5, label_smoothing=0.0, tpo_alpha=1.0,
                                       tpo_l_gamma=0.25)
    torch.testing.assert_close(out.losses, torch.tensor([_softplus(0.25) + 1.6, _softplus(-0.25) + 1.6]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0, -1.5]))


def test_the_gold_column_in_explicit_and_conversational_records(tmp_path):
    path = tmp_path / "triples.jsonl"
    user = [{"role": "user", "content": "Sky?"}]
    rows = [{"prompt": "Sky?", "chosen": " blue.", "rejected": " green.", "reference": " A clear blue."},
            {"prompt": "Sea?", "chosen": " blue.", "rejected": " red.", "gold": " Deep blue."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs, _ = formats.load_pairs(str(path))
    assert [p.gold for p in pairs] == [" A clear blue.", " Deep blue."]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": user, "chosen": [{"role": "assistant", "content": "Blue."}],
                                "rejected": [{"role": "assistant", "content": "Green."}],
                                "reference": user + [{"role": "assistant", "content": "Clear blue."}]}) + "\n",
                    encoding="utf-8")
    pair, = formats.load_pairs(str(chat))[0]
    assert pair.gold == [{"role": "assistant", "content": "Clear blue."}]  # the repeated prompt is cut off


def _triples(tokenizer):
    """Pairs with gold responses: text and chat, two sharing a prompt (and a gold equal to another's chosen)."""
    user = [{"role": "user", "content": "What is 2 plus 2?"}]
    plain = [formats.PreferencePair("Human: What is 3 plus 3?\n\nAssistant:", " 6.", " I think 7.", gold=" It is 6."),
             formats.PreferencePair("Human: What is 3 plus 3?\n\nAssistant:", " It is 6.", " 9.", gold=" 6, surely."),
             formats.PreferencePair("Human: What is 5 plus 5?\n\nAssistant:", " 10.", " 11.")]
    chat = [formats.PreferencePair(user, [{"role": "assistant", "content": "4."}],
                                   [{"role": "assistant", "content": "5."}],
                                   gold=[{"role": "assistant", "content": "It is 4."}])]
    return tokenization.tokenize_pairs(plain + chat, tokenizer, max_length=256)[0]


def test_gold_ids_have_the_exact_boundary(tokenizer):
    """prompt + gold is the full text's tokenization (with EOS for text), as chosen's is, and flags the pair."""
    tokenized = _triples(tokenizer)
    first = tokenized[0]
    full, = tokenizer(["Human: What is 3 plus 3?\n\nAssistant: It is 6."])["input_ids"]
    assert first.prompt_ids + first.gold_ids == full + [tokenizer.eos_token_id]
    assert first.extras == {tokenization.GOLD: 1.0} and tokenized[2].gold_ids is None and not tokenized[2].extras
    chat = tokenized[3]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"},
                                              {"role": "assistant", "content": "It is 4."}], tokenize=False)
    assert tokenizer.decode(chat.prompt_ids + chat.gold_ids, skip_special_tokens=False).endswith(
        rendered[-len("It is 4.<|end|>"):])
    assert chat.num_tokens == len(chat.prompt_ids) + len(chat.chosen_ids) + len(chat.rejected_ids) + \
        len(chat.gold_ids)


def test_the_cache_keeps_gold_responses(tmp_path, tokenizer):
    tokenized = _triples(tokenizer)
    data_cache.save(tmp_path, "k", data_cache.CachedData({"train": tokenized, "eval": []}))
    loaded = data_cache.load(tmp_path, "k")
    assert loaded is not None and loaded.splits["train"] == tokenized


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gold_logprob_equals_a_naive_full_logits_forward(layout, tokenizer, tiny_model, one_thread):
    """The gold response is one more completion of its prompt's block: its log-prob from the batch equals the
    textbook forward of prompt + gold alone, in every layout."""
    tokenized = _triples(tokenizer)
    batch = make_batch(tokenized, layout=layout, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        token_logps, _ = SequenceScorer(tiny_model, chunk_size=7)(
            batch.input_ids, batch.position_ids, batch.attention_mask, batch.score_index, batch.target_ids)
        gold = gold_logps(batch, token_logps)
        expected = [naive_sequence_logps(tiny_model, p.prompt_ids, p.gold_ids) if p.gold_ids else math.nan
                    for p in tokenized]
    torch.testing.assert_close(gold[GOLD_LOGPS], torch.tensor(expected), equal_nan=True, atol=1e-5, rtol=1e-5)
    lengths = [len(p.gold_ids) if p.gold_ids else math.nan for p in tokenized]
    torch.testing.assert_close(gold[GOLD_LENGTHS], torch.tensor(lengths), equal_nan=True)
    if layout != "concatenated":  # one block per prompt: the shared gold/chosen response is forwarded once
        assert batch.gold_index[0] != batch.chosen_index[0] and batch.gold_index[0] == batch.chosen_index[1]


@pytest.fixture
def triples_jsonl(tmp_path):
    path = tmp_path / "triples.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Human: What is {i} plus {i}?\n\nAssistant:",
                                        "chosen": f" {2 * i}.", "rejected": f" maybe {i + 3}?",
                                        "reference": f" {i} plus {i} is {2 * i}."}) + "\n" for i in range(16)),
                    encoding="utf-8")
    return path


def test_dpo_train_loss_tpo_through_the_cli(tmp_path, capsys, triples_jsonl, tiny_model_dir, monkeypatch):
    """Both losses in one run (the sum is finite only if each is), with a held-out split scored the same way."""
    monkeypatch.setattr(models, "frozen_copy", lambda *a, **k: pytest.fail("TPO built a reference model"))
    monkeypatch.setattr(report, "plot_curves", lambda *args, **kwargs: None)
    code, out, err = run_cli(["train", "--model", str(tiny_model_dir), "--data", str(triples_jsonl),
                              "--loss", "tpo,tpo-l", "--tpo-alpha", "0.5", "--tpo-l-gamma", "0.3", "--batch-size", "4",
                              "--max-steps", "2", "--eval-fraction", "0.25", "--output", str(tmp_path / "run"),
                              "--no-progress"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert math.isfinite(last["loss"]) and last["gold_nll"] > 0


def test_a_loss_that_ignores_the_gold_column_never_forwards_it(triples_jsonl, tiny_model_dir):
    """--loss sigmoid on data with gold responses: the pairs lose their gold ids (no third completion in any
    batch) and the notes say how many were ignored; --loss tpo keeps every one."""
    from dpokit.config import Config
    from dpokit.loop import prepare_data
    from dpokit.objective import Objective

    for loss, kept in (("sigmoid", 0), ("tpo", 16)):
        cfg = Config(model=str(tiny_model_dir), data=str(triples_jsonl), loss=loss, cache=False)
        _, data = prepare_data(cfg, Objective.from_config(cfg))
        assert sum(p.gold_ids is not None for p in data.train + data.eval) == kept
        assert any("gold responses: 16 ignored" in note for note in data.notes) == (kept == 0)
        batch = make_batch(data.train[:4], pad_id=data.pad_id, layout="shared")
        assert (batch.gold_index is None) == (kept == 0)


@pytest.mark.parametrize("flags,fragment", [
    ([], "--loss tpo: needs a gold response on every pair"),
    (["--tpo-alpha", "-1"], "--loss tpo: --tpo-alpha must not be negative"),
])
def test_tpo_refusals_come_before_any_model_loads(tmp_path, capsys, pairs_jsonl, tokenizer_dir, monkeypatch, flags,
                                                  fragment):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, out, err = run_cli(["train", "--model", "tiny", "--tokenizer", str(tokenizer_dir), "--data",
                              str(pairs_jsonl), "--loss", "tpo", *flags, "--max-steps", "1",
                              "--output", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code != 0 and fragment in err and len(err.strip().splitlines()) == 1


def test_tpo_needs_the_gold_of_every_batch():
    policy, _ = _inputs()
    with pytest.raises(DPOError, match="no gold responses"):
        losses.get("tpo").function(policy, None, {}, beta=0.1, label_smoothing=0.0, tpo_alpha=1.0)
