"""4-bit input embeddings and LM head (`--quantize-embeddings`, `dpokit.quantized_tables`).

The independent computation throughout is bitsandbytes' own round trip of the whole table (`quantize_4bit` then
`dequantize_4bit`, blocks of 64): a table's rows, its sliced head products and their gradients equal those of
that dequantized matrix; a QLoRA model with 4-bit tables gives the log-probs, adapter gradients, logits and
greedy generations of transformers' own forward on the same 4-bit linears with the round-tripped tables in
float32; nothing of the tables' full-precision size stays in the model or in autograd's saved tensors; `dpo
train --quantize-embeddings` trains, records it in the model card, merges into a full-precision model that
scores as the adapter on the 4-bit base, resumes exactly and gives the same run with `--precompute-ref`.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dpokit import models, quantized_tables
from dpokit.batching import make_batch
from dpokit.cli import main
from dpokit.config import Config
from dpokit.errors import DPOError
from dpokit.fused_head import fused_sequence_loss
from dpokit.logprobs import SequenceScorer, sequence_logps
from dpokit.quantized_tables import QuantizedLMHead, QuantizedTable
from test_batching import make_pairs
from test_qlora import (FixedReferenceDPO, adapter_params, metric_rows, naive_logps_and_grads, run_args,
                        saved_for_backward)
from test_reference import naive_pair_logps, random_pairs, randomize_lora

bnb = pytest.importorskip("bitsandbytes")


def round_trip(weight: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """The whole table quantized and dequantized by bitsandbytes at once."""
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                                 compress_statistics=False)
    return bnb.functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("slice_rows", [7, 64, 4096])
def test_rows_head_products_and_gradients_equal_the_whole_dequantized_table(monkeypatch, quant_type, slice_rows):
    monkeypatch.setattr(quantized_tables, "SLICE_ROWS", slice_rows)
    torch.manual_seed(0)
    weight = torch.randn(300, 128)
    table, want = QuantizedTable(weight, quant_type), round_trip(weight, quant_type)
    assert table.packed.numel() == 300 * 128 // 2 and not (want == weight).all()

    ids = torch.tensor([[5, 0, 299], [5, 17, 42]])
    assert torch.equal(table.lookup(ids), want[ids])
    assert torch.equal(table.dequantize(), want)

    hidden = torch.randn(2, 9, 128, requires_grad=True)
    logits = QuantizedLMHead(table)(hidden)
    torch.testing.assert_close(logits, hidden @ want.T, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(2, 9, 300)
    (grad,) = torch.autograd.grad(logits, hidden, upstream)
    torch.testing.assert_close(grad, upstream @ want, rtol=1e-5, atol=1e-4)  # summed in another order


def build_model(path, vocab_size: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model_dir(request, tmp_path_factory, tokenizer):
    """A 2-layer Llama of hidden size 64 (a multiple of the 64-weight blocks), untied and tied."""
    path = tmp_path_factory.mktemp("llama-64")
    build_model(path, len(tokenizer), request.param)
    tokenizer.save_pretrained(path)
    return path


def with_adapter(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    randomize_lora(model)
    return model


@pytest.fixture(scope="module")
def policy(model_dir):
    """QLoRA with 4-bit tables, lean layers on."""
    return with_adapter(models.load_model(str(model_dir), quantization=models.Quantization(4, embeddings=True)))


def round_tripped_base(model_dir) -> torch.nn.Module:
    """The same 4-bit linears with transformers' own layers, the tables round-tripped and kept in float32."""
    from transformers import AutoModelForCausalLM

    model = models.load_model(str(model_dir), lean=False, quantization=models.Quantization(4))
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(round_trip(full.get_input_embeddings().weight))
        model.get_output_embeddings().weight.copy_(round_trip(full.get_output_embeddings().weight))
    return model


@pytest.fixture(scope="module")
def plain(model_dir):
    """The independent computation: `round_tripped_base` with the policy's adapter."""
    return with_adapter(round_tripped_base(model_dir))


def test_tables_replace_the_float_ones_shared_when_tied(model_dir, policy):
    embedding, head = policy.get_input_embeddings(), policy.get_output_embeddings()
    assert (embedding.table is head.table) == policy.config.tie_word_embeddings
    vocab, hidden = policy.config.vocab_size, policy.config.hidden_size
    floats = [name for name, t in [*policy.named_parameters(), *policy.named_buffers()]
              if t.dtype.is_floating_point and t.numel() >= vocab * hidden]
    assert floats == []


@pytest.mark.parametrize("layout,capacity", [("concatenated", None), ("packed", 40), ("blocks", None)])
def test_logps_and_adapter_gradients_equal_transformers_forward(policy, plain, layout, capacity, monkeypatch):
    monkeypatch.setattr(quantized_tables, "SLICE_ROWS", 100)  # several slices of the vocabulary
    pairs = make_pairs(policy.config.vocab_size)
    want_chosen, want_rejected, want_grads = naive_logps_and_grads(plain, pairs)

    got = sequence_logps(SequenceScorer(policy, 3), make_batch(pairs, layout=layout, pad_id=0, row_capacity=capacity))
    params = adapter_params(policy)
    grads = torch.autograd.grad(got.chosen.sum() - 0.5 * got.rejected.sum(), list(params.values()))

    torch.testing.assert_close(got.chosen.detach(), want_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.rejected.detach(), want_rejected, rtol=1e-5, atol=1e-4)
    for name, grad in zip(params, grads):  # gradients up to ~5 in size, summed in another order
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-4, msg=name)


def test_fused_head_loss_equals_full_logits(policy, plain, monkeypatch):
    monkeypatch.setattr(quantized_tables, "SLICE_ROWS", 100)
    pairs = make_pairs(policy.config.vocab_size)
    loss = FixedReferenceDPO(pairs)
    want_total, want_grads, _ = loss.naive(plain)

    total, _ = fused_sequence_loss(SequenceScorer(policy, 3), make_batch(pairs, layout="packed", pad_id=0), loss, 3)
    grads = torch.autograd.grad(total, list(adapter_params(policy).values()))
    torch.testing.assert_close(total.detach(), want_total, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_transformers_forward_and_greedy_generation_match(policy, plain):
    prompt = torch.tensor([[1, 17, 40, 9, 33]])
    with torch.no_grad():
        torch.testing.assert_close(policy(prompt).logits, plain(prompt).logits, rtol=1e-5, atol=1e-5)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(policy.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))


def test_backward_keeps_nothing_of_the_tables_size(policy):
    vocab, hidden = policy.config.vocab_size, policy.config.hidden_size
    saved, _ = saved_for_backward(policy, make_pairs(vocab))
    assert saved and not [t.shape for t in saved if t.dtype.is_floating_point and t.numel() >= vocab * hidden]


def test_flag_problems_are_one_line(tiny_model_dir):
    with pytest.raises(DPOError, match="--quantize-embeddings stores the embeddings in 4 bits beside a 4-bit base"):
        Config(quantize_embeddings=True, lora_r=8)
    with pytest.raises(DPOError, match="needs a hidden size divisible by 64 \\(this model's is 32\\)"):
        models.load_model(str(tiny_model_dir), quantization=models.Quantization(4, embeddings=True))
    assert models.Quantization(4, embeddings=True).describe() == (
        "4-bit NF4, embeddings and LM head in 4 bits too, compute float32 (bitsandbytes)")


def test_dpo_train_quantize_embeddings_merges_into_a_model_that_scores_as_the_adapter(model_dir, pairs_jsonl,
                                                                                      tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    output = tmp_path / "run"
    main(run_args(model_dir, pairs_jsonl, output, "--quantize-embeddings", "--lora-r", "4", "--max-steps", "2",
                  "--merge-lora"))
    assert "embeddings and LM head in 4 bits too" in (output / "model" / "README.md").read_text()
    on_4bit = PeftModel.from_pretrained(round_tripped_base(model_dir), output / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(output / "model")
    assert "quantization_config" not in json.loads((output / "model" / "config.json").read_text())
    pairs = random_pairs(merged.config.vocab_size)
    for got, want in zip(naive_pair_logps(merged, pairs), naive_pair_logps(on_4bit, pairs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_a_bfloat16_table_dequantizes_to_bfloat16_and_its_head_to_float32_logits():
    torch.manual_seed(0)
    weight = torch.randn(300, 128).bfloat16()
    table, want = QuantizedTable(weight, "nf4"), round_trip(weight)
    assert want.dtype == torch.bfloat16 and torch.equal(table.lookup(torch.tensor([3, 7])), want[[3, 7]])
    hidden = torch.randn(5, 128).bfloat16().requires_grad_()
    logits = QuantizedLMHead(table)(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, F.linear(hidden, want).float(), rtol=0, atol=0)
    upstream = torch.randn(5, 300)
    (grad,) = torch.autograd.grad(logits, hidden, upstream)
    torch.testing.assert_close(grad, upstream.bfloat16() @ want, rtol=2e-2, atol=2e-2)  # bf16 rounding


def test_resumed_and_precomputed_runs_with_4bit_tables_are_the_same_run(model_dir, pairs_jsonl, tmp_path):
    def train(output, *extra):
        main(run_args(model_dir, pairs_jsonl, output, "--quantize-embeddings", "--lora-r", "4", "--max-steps", "3",
                      *extra))
        return output

    full = train(tmp_path / "full", "--save-every", "2")
    resumed = train(tmp_path / "resumed", "--resume", str(full / "checkpoints" / "step-2"))
    want, got = (load_file(out / "model" / "adapter_model.safetensors") for out in (full, resumed))
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)
    assert metric_rows(resumed)[2:] == metric_rows(full)[2:]

    precomputed = train(tmp_path / "precomputed", "--precompute-ref")
    for row, want_row in zip(metric_rows(precomputed), metric_rows(full), strict=True):
        assert row.keys() == want_row.keys()
        for key in want_row:
            assert row[key] == pytest.approx(want_row[key], rel=1e-4, abs=1e-5), key
