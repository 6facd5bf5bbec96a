"""LoRA through PEFT: only the adapter trains, merging keeps the log-probs, `dpo train --lora-r` saves loadable
adapters and merged models, and training resumes from an adapter."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit import models
from dpokit.batching import make_batch
from dpokit.cli import main
from dpokit.errors import DPOError
from dpokit.logprobs import SequenceScorer, sequence_logps
from dpokit.reference import AdapterReference
from test_reference import naive_pair_logps, random_pairs, randomize_lora


def test_default_targets_are_attention_and_mlp_linears_not_the_head(tiny_model):
    policy = models.apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    wrapped = {name.split(".")[-1] for name, module in policy.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in name or "embed" in name for name, p in policy.named_parameters() if p.requires_grad)


def test_unknown_target_module_is_a_dpo_error(tiny_model):
    with pytest.raises(DPOError, match="--lora-target-modules"):
        models.apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="no_such_proj")


def test_only_adapter_parameters_change_during_lora_training(tiny_model):
    """DPO steps as the loop takes them: policy forward, disabled-adapter reference, loss, backward, AdamW."""
    from dpokit import losses

    policy = models.apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    policy.train()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    scorer, reference = SequenceScorer(policy), AdapterReference(policy)
    batch = make_batch(random_pairs(tiny_model.config.vocab_size, count=4), layout="packed")
    for _ in range(2):
        policy_logps = sequence_logps(scorer, batch)
        reference_logps = reference.logps(batch)
        losses.get("sigmoid").function(policy_logps, reference_logps, batch.extras, beta=0.1).losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name, param in policy.named_parameters():
        moved = not torch.equal(param.detach(), before[name])
        if "lora_B" in name:  # B starts at 0 and gets the gradient first; A moves from the second step
            assert moved, name
        elif "lora_" not in name:
            assert not moved, name
    assert any("lora_A" in n and not torch.equal(p.detach(), before[n]) for n, p in policy.named_parameters())


def test_merged_model_scores_like_base_plus_adapter(tiny_model, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = models.apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    randomize_lora(policy)
    pairs = random_pairs(tiny_model.config.vocab_size)
    adapted = naive_pair_logps(policy, pairs)

    model_dir = models.save_policy(policy, tmp_path, merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    for got, want in zip(naive_pair_logps(merged, pairs), adapted):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")  # adapter saved next to the merged model
    for got, want in zip(naive_pair_logps(reloaded, pairs), adapted):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dpo_train_lora_saves_a_loadable_adapter_and_resumes_into_a_merged_model(tiny_model_dir, pairs_jsonl,
                                                                                   tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    common = ["train", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--batch-size", "4",
              "--lr", "1e-2", "--no-progress", "--no-cache", "--eval-fraction", "0.1"]
    main(common + ["--lora-r", "8", "--max-steps", "2", "--output", str(tmp_path / "first")])
    adapter_dir = tmp_path / "first" / "model"
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").exists()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    trained = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)  # finds the base through the adapter config
    pairs = random_pairs(trained.config.vocab_size)
    base_logps = naive_pair_logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), pairs)[0]
    assert (naive_pair_logps(trained, pairs)[0] - base_logps).abs().max() > 1e-3  # the adapter learned something

    main(common + ["--lora-adapter", str(adapter_dir), "--max-steps", "1", "--merge-lora",
                   "--output", str(tmp_path / "second")])
    # The second run starts where the first ended: same policy (base + adapter), same reference (the base).
    first_end, second_start = read_rows(tmp_path / "first" / "metrics.jsonl")[-1], read_rows(
        tmp_path / "second" / "metrics.jsonl")[0]
    assert second_start["step"] == 0
    assert second_start["eval/rewards/margins"] == pytest.approx(first_end["eval/rewards/margins"], rel=1e-5)
    assert second_start["eval/rewards/margins"] != 0.0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "second" / "model")
    resumed = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        tmp_path / "second" / "adapter")
    for got, want in zip(naive_pair_logps(merged, pairs), naive_pair_logps(resumed, pairs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_lora_flag_problems_are_dpo_errors(tiny_model, tmp_path):
    from dpokit.config import Config

    with pytest.raises(DPOError, match="--merge-lora needs LoRA"):
        Config(merge_lora=True)
    with pytest.raises(DPOError, match="no PEFT adapter here"):
        models.load_lora_adapter(tiny_model, str(tmp_path))
