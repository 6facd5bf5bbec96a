"""Reference strategies: disabled LoRA adapter vs a frozen copy, TR-DPO sync, --ref-model, refused combinations."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dpokit import models
from dpokit.batching import make_batch
from dpokit.cli import main
from dpokit.errors import DPOError
from dpokit.logprobs import naive_sequence_logps
from dpokit.reference import AdapterReference, ModelReference, reference_strategy
from dpokit.data.tokenization import TokenizedPair


def random_pairs(vocab: int, count: int = 3, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(4 + i), ids(3 + i), ids(5)) for i in range(count)]


def naive_pair_logps(model: torch.nn.Module, pairs: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        chosen = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs])
        rejected = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs])
    return chosen, rejected


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """LoRA starts as a no-op (B = 0); give B values so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)


def test_disabled_adapter_reference_matches_a_frozen_copy_of_the_base(tiny_model):
    base_copy = copy.deepcopy(tiny_model)
    policy = models.apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    randomize_lora(policy)
    pairs = random_pairs(tiny_model.config.vocab_size)
    reference = AdapterReference(policy, chunk_size=5)

    for layout in ("concatenated", "packed"):
        got = reference.logps(make_batch(pairs, layout=layout))
        chosen, rejected = naive_pair_logps(base_copy, pairs)
        torch.testing.assert_close(got.chosen, chosen, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got.rejected, rejected, rtol=1e-5, atol=1e-4)
    adapted_chosen, _ = naive_pair_logps(policy, pairs)  # the adapter is back on after the reference call
    assert (adapted_chosen - chosen).abs().max() > 1e-2
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_tr_dpo_soft_and_hard_updates_follow_the_formula(tiny_model):
    policy = tiny_model
    reference_model = copy.deepcopy(policy)
    with torch.no_grad():
        for param in reference_model.parameters():
            param.add_(torch.randn_like(param))
    before = {n: p.detach().clone() for n, p in reference_model.named_parameters()}
    reference = ModelReference(reference_model)

    reference.sync(policy, 0.25)
    for name, param in policy.named_parameters():
        expected = 0.25 * param.detach() + 0.75 * before[name]  # ref = a*policy + (1-a)*ref
        torch.testing.assert_close(dict(reference_model.named_parameters())[name], expected)

    reference.sync(policy, 1.0)
    for name, param in policy.named_parameters():
        assert torch.equal(dict(reference_model.named_parameters())[name], param.detach())
    assert not any(p.requires_grad for p in reference_model.parameters())


def test_ref_sync_refuses_a_reference_of_another_shape(tiny_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=tiny_model.config.vocab_size, hidden_size=16,
                                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(DPOError, match="differ"):
        ModelReference(other).sync(tiny_model, 0.5)


@pytest.mark.parametrize("options, message", [
    (dict(needs_reference=False, ref_model="sft"), "--ref-model: loss simpo is reference-free"),
    (dict(needs_reference=False, ref_sync_every=4), "--ref-sync-every: loss simpo is reference-free"),
    (dict(needs_reference=False, precompute_ref=True), "--precompute-ref: loss simpo is reference-free"),
    (dict(precompute_ref=True, ref_sync_every=4), "cannot be precomputed"),
    (dict(lora=True, ref_sync_every=4), "use full fine-tuning"),
    (dict(lora=True, ref_model="sft", ref_sync_every=4), "use full fine-tuning"),
])
def test_incompatible_reference_options_are_refused(options, message):
    settings = dict(loss_names=["simpo"], needs_reference=True, lora=False, ref_model=None, precompute_ref=False,
                    ref_sync_every=None) | options
    with pytest.raises(DPOError, match=message):
        reference_strategy(**settings)


@pytest.mark.parametrize("options, strategy", [
    (dict(needs_reference=False), "none"),
    (dict(), "copy"),
    (dict(ref_sync_every=2), "copy"),
    (dict(ref_model="sft"), "model"),
    (dict(lora=True), "adapter"),
    (dict(lora=True, ref_model="sft"), "model"),  # asked for explicitly: honoured
])
def test_reference_strategy_choice(options, strategy):
    settings = dict(loss_names=["sigmoid"], needs_reference=True, lora=False, ref_model=None, precompute_ref=False,
                    ref_sync_every=None) | options
    assert reference_strategy(**settings) == strategy


def test_ref_model_gives_its_own_logps_not_the_policys(tiny_model_dir, tmp_path, pairs_jsonl):
    """The reference scores with --ref-model's weights, and `dpo train --ref-model` uses them: before any step the
    rewards are beta * (policy - reference) log-ratios, which are 0 with the default frozen copy."""
    from conftest import build_tiny_llama

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    other_dir = tmp_path / "other"
    other = build_tiny_llama(other_dir, vocab_size=vocab, seed=7)
    reference = ModelReference(models.load_model(str(other_dir)))
    policy = models.load_model(str(tiny_model_dir))
    pairs = random_pairs(vocab)
    got = reference.logps(make_batch(pairs, layout="packed"))
    torch.testing.assert_close(got.chosen, naive_pair_logps(other, pairs)[0], rtol=1e-5, atol=1e-4)
    assert (got.chosen - naive_pair_logps(policy, pairs)[0]).abs().min() > 1e-3

    main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--max-steps", "1",
          "--batch-size", "4", "--no-progress", "--no-cache", "--eval-fraction", "0.1",
          "--output", str(tmp_path / "run"), "--ref-model", str(other_dir)])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and abs(first["eval/rewards/chosen"]) > 1e-3


def test_dpo_train_hard_ref_sync_leaves_the_reference_equal_to_the_policy(tiny_model_dir, tmp_path, pairs_jsonl):
    """With --ref-sync-every 1 --ref-sync-alpha 1 the reference is the policy after every step, so the held-out
    rewards after training (beta * log-ratios) are exactly 0, although the policy moved (log-probs changed)."""
    main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--max-steps", "2", "--lr", "1e-2",
          "--batch-size", "4", "--no-progress", "--no-cache", "--eval-fraction", "0.1",
          "--output", str(tmp_path / "run"), "--ref-sync-every", "1", "--ref-sync-alpha", "1"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 2 and "eval/rewards/chosen" in after
    assert after["eval/logps/chosen"] != pytest.approx(before["eval/logps/chosen"], abs=1e-3)
    assert after["eval/rewards/chosen"] == 0.0 and after["eval/rewards/rejected"] == 0.0


def test_cli_refuses_ref_model_with_a_reference_free_loss(tiny_model_dir, tmp_path, pairs_jsonl, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--loss", "simpo",
              "--ref-model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--no-progress"])
    assert exit_info.value.code == 2
    assert "reference-free" in capsys.readouterr().err
