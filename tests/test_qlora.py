"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): a LoRA adapter trained on a 4-bit base.

Every speed path (prefix sharing, packing, the block layout, the chunked and the fused LM head, lean layers,
gradient checkpointing) gives the log-probs and adapter gradients of transformers' own forward on the same
quantized model, from full logits; the reference is that quantized base with the adapter off; `dpo train
--load-in-4bit` saves an adapter that loads on the 4-bit and the full-precision base, merges into a dequantized
full-precision model that scores as the trained policy, resumes exactly, and gives the same run with
`--precompute-ref` or a 4-bit `--ref-model`; bad flag combinations are one line.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dpokit import models
from dpokit.batching import make_batch
from dpokit.cli import main
from dpokit.config import Config
from dpokit.errors import DPOError
from dpokit.fused_head import fused_sequence_loss
from dpokit.logprobs import SequenceScorer, naive_sequence_logps, sequence_logps
from dpokit.model_card import CardInfo, front_matter, render_card
from dpokit.reference import AdapterReference
from test_batching import LAYOUTS, make_pairs
from test_reference import naive_pair_logps, random_pairs, randomize_lora

bnb = pytest.importorskip("bitsandbytes")

TIMING = {"pairs_per_s", "tokens_per_s", "elapsed_s"}


def quantized(path, *, bits: int = 4, lean: bool = True, dtype: str = "float32") -> torch.nn.Module:
    return models.load_model(str(path), dtype=dtype, lean=lean,
                             quantization=models.Quantization(bits, compute_dtype=dtype))


def qlora(path, *, bits: int = 4, lean: bool = True) -> torch.nn.Module:
    """The tiny Llama's linears in `bits` bits, LoRA on all of them, B drawn at random so the adapter matters."""
    torch.manual_seed(0)  # lora_A's initialisation
    policy = models.apply_lora(quantized(path, bits=bits, lean=lean), r=4, alpha=8, dropout=0.0,
                               target_modules="all-linear")
    randomize_lora(policy)
    return policy


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The speed paths under test: lean layers on."""
    return qlora(tiny_model_dir)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """The same quantized weights and adapter with transformers' own layers: the independent computation."""
    return qlora(tiny_model_dir, lean=False)


def adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def naive_logps_and_grads(model, pairs, weights=(1.0, -0.5)):
    """Full-logits log-probs of each completion and the adapter gradients of a fixed mix of them."""
    chosen = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.rejected_ids) for p in pairs])
    params = adapter_params(model)
    grads = torch.autograd.grad(weights[0] * chosen.sum() + weights[1] * rejected.sum(), list(params.values()))
    return chosen.detach(), rejected.detach(), dict(zip(params, grads))


def test_linears_are_4bit_and_embeddings_norms_and_head_stay_in_the_compute_dtype(tiny_model_dir):
    for dtype in ("float32", "bfloat16"):
        model = quantized(tiny_model_dir, dtype=dtype)
        linears = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert linears == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == models.DTYPES[dtype]
        assert model.get_input_embeddings().weight.dtype == models.DTYPES[dtype]
        assert model.model.norm.weight.dtype == models.DTYPES[dtype]
        q_proj = model.model.layers[0].self_attn.q_proj
        assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.quant_state.quant_type == "nf4"
        assert q_proj.compute_dtype == models.DTYPES[dtype]


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped safetensors files (Linux /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) > 5 and fields[5].endswith(".safetensors"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_unquantized_weights_own_their_memory_so_the_checkpoint_mapping_can_go(tiny_model_dir):
    """A float weight left as a view on the mapped checkpoint keeps the mapping, and with it the pages of the
    full-precision linears read while quantizing, resident (216 MiB on benchmarks/memory.py's model)."""
    model = quantized(tiny_model_dir)
    ranges = file_mappings()
    floats = {name: p for name, p in model.named_parameters() if p.dtype.is_floating_point}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= floats.keys()
    on_file = [name for name, p in floats.items() if any(start <= p.data_ptr() < end for start, end in ranges)]
    assert on_file == []


def saved_for_backward(model, pairs) -> tuple[list[torch.Tensor], int]:
    """The tensors autograd keeps for the backward pass of the adapter gradients, and their bytes apart from
    the model's own parameters (each storage counted once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: list[torch.Tensor] = []
    storages: dict[int, int] = {}

    def pack(tensor):
        saved.append(tensor)
        if tensor.untyped_storage().data_ptr() not in params:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sequence_logps(SequenceScorer(model, 3), make_batch(pairs, layout="blocks", pad_id=0))
    return saved, sum(storages.values())


def test_backward_keeps_no_dequantized_weight(tiny_model_dir, policy):
    """bitsandbytes' 4-bit matmul dequantizes each weight to a float matrix; autograd must not keep it (a float
    copy of every layer from forward to backward). Against LoRA on the full-precision model with the same lean
    layers, whose frozen weights autograd keeps as the parameters themselves: the same activations, byte for
    byte."""
    pairs = make_pairs(policy.config.vocab_size)
    saved, saved_bytes = saved_for_backward(policy, pairs)
    for module in policy.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert not any(t.shape in (weight.shape, weight.T.shape) and torch.equal(t.reshape(weight.shape), weight)
                           for t in saved if t.dtype == weight.dtype)

    torch.manual_seed(0)
    lora = models.apply_lora(models.load_model(str(tiny_model_dir)), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    assert saved_bytes == saved_for_backward(lora, pairs)[1] > 0


def test_lean_mlp_runs_the_quantized_projections_own_forward(policy):
    """The lean SwiGLU calls gate_proj/up_proj as modules (dequantize + matmul + LoRA), never `.weight` @ x."""
    mlp = policy.base_model.model.model.layers[0].mlp
    assert type(mlp).__name__ == "LeanLlamaMLP"
    x = torch.randn(3, mlp.gate_proj.in_features)
    with torch.no_grad():
        want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout,capacity", LAYOUTS)
@pytest.mark.parametrize("chunk_size", [3, 10_000])
def test_logps_and_adapter_gradients_equal_transformers_forward_in_every_layout(policy, plain, layout, capacity,
                                                                                chunk_size):
    pairs = make_pairs(policy.config.vocab_size)
    want_chosen, want_rejected, want_grads = naive_logps_and_grads(plain, pairs)

    batch = make_batch(pairs, layout=layout, pad_id=0, row_capacity=capacity)
    got = sequence_logps(SequenceScorer(policy, chunk_size), batch)
    params = adapter_params(policy)
    grads = torch.autograd.grad(got.chosen.sum() - 0.5 * got.rejected.sum(), list(params.values()))

    torch.testing.assert_close(got.chosen.detach(), want_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.rejected.detach(), want_rejected, rtol=1e-5, atol=1e-4)
    for name, grad in zip(params, grads):
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


class FixedReferenceDPO:
    """DPO (beta 0.3) against fixed reference log-probs, as `fused_sequence_loss` takes a loss; `naive` gives its
    summed loss, adapter gradients and chosen log-probs from `model`'s full-logits forward."""

    def __init__(self, pairs) -> None:
        self.pairs = pairs
        self.reference = torch.linspace(-30.0, -10.0, 2 * len(pairs)).reshape(2, -1)

    def __call__(self, policy, ids: torch.Tensor) -> torch.Tensor:
        return self.losses(policy.chosen, policy.rejected, ids)

    def losses(self, chosen: torch.Tensor, rejected: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(0.3 * ((chosen - self.reference[0, ids]) - (rejected - self.reference[1, ids])))

    def naive(self, model) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        chosen = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.chosen_ids) for p in self.pairs])
        rejected = torch.stack([naive_sequence_logps(model, p.prompt_ids, p.rejected_ids) for p in self.pairs])
        total = self.losses(chosen, rejected, torch.arange(len(self.pairs))).sum()
        return total.detach(), torch.autograd.grad(total, list(adapter_params(model).values())), chosen.detach()


@pytest.mark.parametrize("layout,capacity", [("blocks", None), ("packed", 40)])
def test_fused_head_loss_and_adapter_gradients_equal_full_logits(policy, plain, layout, capacity):
    pairs = make_pairs(policy.config.vocab_size)
    loss = FixedReferenceDPO(pairs)
    want_total, want_grads, chosen = loss.naive(plain)

    batch = make_batch(pairs, layout=layout, pad_id=0, row_capacity=capacity)
    total, logps = fused_sequence_loss(SequenceScorer(policy, 3), batch, loss, 3)
    grads = torch.autograd.grad(total, list(adapter_params(policy).values()))

    torch.testing.assert_close(total.detach(), want_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps.chosen, chosen, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def blocks_logps_and_grads(model, pairs):
    got = sequence_logps(SequenceScorer(model, 3), make_batch(pairs, layout="blocks", pad_id=0))
    params = adapter_params(model)
    grads = torch.autograd.grad(got.chosen.sum() - 0.5 * got.rejected.sum(), list(params.values()))
    return got.chosen.detach(), got.rejected.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("bits", [4, 8])
def test_gradient_checkpointing_keeps_the_adapter_gradients(tiny_model_dir, bits):
    """Non-reentrant checkpointing (as `build_policy` enables it) needs no input-grad hook on a frozen base."""
    pairs = make_pairs(400)
    baseline = qlora(tiny_model_dir, bits=bits)
    baseline.train()
    _, _, want_grads = blocks_logps_and_grads(baseline, pairs)
    model = qlora(tiny_model_dir, bits=bits)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _, _, grads = blocks_logps_and_grads(model, pairs)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_8bit_base_agrees_with_transformers_forward_to_int8_precision(tiny_model_dir):
    """LLM.int8() casts activations to float16 and picks its float16 outlier columns over the whole batch, so
    a packed row and one sequence alone differ by that rounding (about 2e-3 nats here), not more."""
    pairs = make_pairs(400)
    want_chosen, _, want_grads = naive_logps_and_grads(qlora(tiny_model_dir, bits=8, lean=False), pairs)
    chosen, _, grads = blocks_logps_and_grads(qlora(tiny_model_dir, bits=8), pairs)
    torch.testing.assert_close(chosen, want_chosen, rtol=0, atol=1e-2)
    for name, grad in grads.items():
        assert (grad - want_grads[name]).abs().max() <= 0.05 * want_grads[name].abs().max(), name


def test_reference_is_the_quantized_base_with_the_adapter_off(tiny_model_dir, tiny_model, policy):
    pairs = random_pairs(policy.config.vocab_size)
    got = AdapterReference(policy, chunk_size=5).logps(make_batch(pairs, layout="blocks", pad_id=0))
    base_4bit = naive_pair_logps(quantized(tiny_model_dir, lean=False), pairs)
    torch.testing.assert_close(got.chosen, base_4bit[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.rejected, base_4bit[1], rtol=1e-5, atol=1e-4)
    full_precision = naive_pair_logps(tiny_model, pairs)[0]
    assert (got.chosen - full_precision).abs().max() > 1e-3  # the 4-bit base, not the full-precision one


def test_flag_problems_are_one_line(monkeypatch):
    with pytest.raises(DPOError, match=r"--load-in-4bit needs LoRA \(--lora-r N or --lora-adapter PATH\)"):
        Config(load_in_4bit=True)
    with pytest.raises(DPOError, match="--load-in-8bit needs LoRA"):
        Config(load_in_8bit=True)
    with pytest.raises(DPOError, match="contradict each other"):
        Config(load_in_4bit=True, load_in_8bit=True, lora_r=8)
    with pytest.raises(DPOError, match="--load-in-4bit does not work with --fsdp"):
        Config(load_in_4bit=True, lora_r=8, fsdp=True)
    with pytest.raises(DPOError, match="add it or drop them"):
        Config(bnb_4bit_quant_type="fp4", lora_r=8)
    with pytest.raises(DPOError, match="must be one of nf4, fp4"):
        Config(load_in_4bit=True, lora_r=8, bnb_4bit_quant_type="int4")
    Config(load_in_4bit=True, lora_adapter="adapter", bnb_4bit_quant_type="fp4", bnb_4bit_double_quant=True)

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(DPOError) as err:
        models.Quantization(4).bnb_config()
    assert str(err.value) == "--load-in-4bit needs the bitsandbytes package: pip install 'dpokit[quantization]'"


def test_model_card_records_the_quantization():
    quantization = models.Quantization(4, "nf4", True, "bfloat16")
    info = CardInfo(name="run", base_model="org/base", base_is_preset=False, losses=["sigmoid"], loss_params={},
                    data=["pairs.jsonl"], counts={}, command="dpo train", quantization=quantization.describe())
    assert "- base weights: 4-bit NF4, double quantization, compute bfloat16 (bitsandbytes)" in render_card(info)
    assert {"qlora", "4-bit", "bitsandbytes"} <= set(front_matter(info)["tags"])


# ---- dpo train --load-in-4bit, end to end ----------------------------------------------------------------------


def run_args(model_dir, data, output, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--batch-size", "4", "--max-pairs", "24",
            "--eval-fraction", "0.2", "--lr", "1e-2", "--no-progress", "--no-cache", "--load-in-4bit",
            "--output", str(output), *extra]


def metric_rows(output) -> list[dict]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, pairs_jsonl, tmp_path_factory):
    """3 QLoRA steps (r=8), checkpoints every 2, adapter merged at the end."""
    output = tmp_path_factory.mktemp("qlora-run")
    main(run_args(tiny_model_dir, pairs_jsonl, output, "--lora-r", "8", "--max-steps", "3", "--save-every", "2",
                  "--merge-lora"))
    return output


def test_dpo_train_load_in_4bit_saves_an_adapter_for_both_bases_and_a_dequantized_merge(tiny_model_dir, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = trained / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 8
    pairs = random_pairs(400)
    on_4bit = PeftModel.from_pretrained(quantized(tiny_model_dir, lean=False), adapter_dir)
    want = naive_pair_logps(on_4bit, pairs)
    base_4bit = naive_pair_logps(quantized(tiny_model_dir, lean=False), pairs)
    assert (want[0] - base_4bit[0]).abs().max() > 1e-3  # the adapter learned something

    # The merged model: full precision, no quantization left, scoring as the adapter on the 4-bit base did.
    merged = AutoModelForCausalLM.from_pretrained(trained / "model")
    assert "quantization_config" not in json.loads((trained / "model" / "config.json").read_text())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    for got, expected in zip(naive_pair_logps(merged, pairs), want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

    on_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    assert torch.isfinite(naive_pair_logps(on_full, pairs)[0]).all()


def test_resumed_qlora_run_is_the_same_run(tiny_model_dir, pairs_jsonl, trained, tmp_path):
    resumed = tmp_path / "resumed"
    main(run_args(tiny_model_dir, pairs_jsonl, resumed, "--lora-r", "8", "--max-steps", "3", "--save-every", "2",
                  "--merge-lora", "--resume", str(trained / "checkpoints" / "step-2")))
    for folder in ("adapter", "model"):
        want, got = (load_file(next((out / folder).glob("*.safetensors"))) for out in (trained, resumed))
        assert want.keys() == got.keys()
        assert all(torch.equal(want[name], got[name]) for name in want), folder
    assert metric_rows(resumed)[2:] == metric_rows(trained)[2:]


@pytest.mark.parametrize("reference", ["--precompute-ref", "--ref-model"])
def test_precomputed_and_4bit_ref_model_references_give_the_same_run(tiny_model_dir, pairs_jsonl, trained,
                                                                     tmp_path, reference):
    extra = ["--precompute-ref"] if reference == "--precompute-ref" else ["--ref-model", str(tiny_model_dir)]
    main(run_args(tiny_model_dir, pairs_jsonl, tmp_path / "run", "--lora-r", "8", "--max-steps", "3", *extra))
    for got, want in zip(metric_rows(tmp_path / "run"), metric_rows(trained), strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key


def _load_preset_in_4bit(rank: int, world_size: int, output) -> None:
    model = models.load_model("tiny", quantization=models.Quantization(4, embeddings=True))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    torch.save(logits, output / f"rank{rank}.pt")


def test_every_torchrun_rank_loads_a_preset_in_4_bits(tmp_path):
    """transformers' `save_pretrained` writes on rank 0 only once a process group exists; each rank quantizes a
    preset from a folder of its own, so each must write it (rank 1 found an empty folder)."""
    from distributed_helpers import fork_ranks

    fork_ranks(_load_preset_in_4bit, 2, tmp_path)
    one = models.load_model("tiny", quantization=models.Quantization(4, embeddings=True))
    with torch.no_grad():
        want = one(torch.tensor([[1, 5, 9, 2]])).logits
    for rank in (0, 1):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), want)
