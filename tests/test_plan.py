"""`dpo plan`: byte counts derived by hand for a tiny config, parameter counts against the models transformers and
peft build, the fit search, and the command's output and bad input (one line each)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from dpokit.errors import DPOError
from dpokit.plan import (Block, DataProfile, ModelShape, RunSettings, Workload, estimate, fit, measured_peak_bytes,
                         one_line_summary, parse_memory, peak_line, shape_from_config, startup_summary, workload)

# vocab 100, hidden 16, 2 layers, 4 heads of 4 / 2 KV heads, MLP 32, untied. Per layer: q 16x16 = 256, k and v
# 16x8 = 128 each, o 256, gate, up, down 16x32 = 512 each: 2,304 in linears + 2 x 16 norm weights = 2,336.
# Whole model: embeddings 1,600 + 2 x 2,336 + final norm 16 + LM head 1,600 = 7,888.
TINY = ModelShape(model_type="llama", vocab=100, hidden=16, layers=2, heads=4, kv_heads=2, head_dim=4,
                  intermediate=32, tied=False)
TINY_PARAMS = 7_888
# LoRA r=2 on every linear: r x (in + out) = q 2x32 = 64, k, v 2x24 = 48 each, o 64, gate, up, down 2x48 = 96 each:
# 512 per layer, 1,024 in all; on q_proj and v_proj only: (64 + 48) x 2 = 224.
TINY_LORA = 1_024
CUDA = RunSettings(device="cuda")   # no host-memory parts: the device's bytes only


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False)


def one_block(prompt: int = 10, completions: tuple[int, ...] = (5, 5)) -> Workload:
    block = Block(prompt, completions)
    return Workload((block,), step_tokens=block.size, step_scored=sum(completions), data_pairs=1)


def test_tiny_config_counted_by_hand():
    assert shape_from_config(tiny_llama_config()) == TINY
    assert TINY.layer_params == 2_336 and TINY.params == TINY_PARAMS
    assert TINY.lora_params(2, "all-linear") == TINY_LORA
    assert TINY.lora_params(2, "q_proj,v_proj") == 224


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "llama-tied-biased"])
def test_parameter_count_matches_the_model_transformers_builds(family):
    import transformers

    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=40)
    if family == "llama-tied-biased":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    else:
        config = transformers.AutoConfig.for_model(family, **common, head_dim=8)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert shape_from_config(config).params == sum(p.numel() for p in model.parameters())


def test_lora_count_matches_peft():
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    for targets, expected in (("all-linear", TINY_LORA), ("q_proj,v_proj", 224)):
        model = LlamaForCausalLM(tiny_llama_config())
        wrapped = peft.get_peft_model(model, peft.LoraConfig(
            r=2, target_modules=targets if targets == "all-linear" else targets.split(","), task_type="CAUSAL_LM"))
        assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == expected


def test_full_fine_tuning_bytes():
    plan = estimate(TINY, CUDA, one_block())
    parts = {name: part.bytes for name, part in plan.parts.items()}
    assert parts["weights"] == TINY_PARAMS * 4                 # float32
    assert parts["gradients"] == TINY_PARAMS * 4
    assert parts["AdamW states"] == 2 * TINY_PARAMS * 4       # exp_avg and exp_avg_sq
    assert parts["reference"] == TINY_PARAMS * 4              # a frozen copy
    assert parts["ddp buckets"] == parts["accumulated gradients"] == parts["tied gradient"] == 0
    # one chunk of logits (10 scored tokens x 100 words x 4 B); the float32 head gradient (100 x 16 x 4 B) and the
    # scored hidden states' (10 x 16 x 4 B)
    assert parts["LM head logits"] == 10 * 100 * 4
    assert parts["head gradient"] == 100 * 16 * 4 + 10 * 16 * 4
    three_chunks = estimate(TINY, replace(CUDA, chunk_size=4), one_block()).parts["LM head logits"].bytes
    assert three_chunks == 4 * 100 * 4                        # one chunk alive at a time
    assert plan.peak == max(plan.phases.values())
    assert plan.phases["end of backward"] == sum(parts[n] for n in (
        "framework", "weights", "reference", "AdamW states", "gradients"))


def test_activations_by_hand():
    """One block: a 10-token prompt and two 5-token completions, forwarded as 20 tokens in one row. Per token and
    layer (float32, lean layers): layer input and normed input 16 each, queries 16, keys and values repeated to the
    4 heads 16 each, attention output and concatenated heads 16 each, residual and its norm 16 each, gate, up and
    product 32 each = 240 floats = 960 B, + one float32 logsumexp per head = 16 B. The second completion attends to
    a copy of the prompt's keys and values and its own: (10 + 5) x 2 x 16 floats = 1,920 B."""
    per_layer = 20 * (960 + 16) + 1_920
    outside = 2 * 20 * 16 * 4 + 10 * 16 * 4                  # final norm's input and output, the scored states
    plan = estimate(TINY, CUDA, one_block())
    assert plan.parts["activations"].bytes == 2 * per_layer + outside
    checkpointed = estimate(TINY, replace(CUDA, gradient_checkpointing=True), one_block())
    assert checkpointed.parts["activations"].bytes == 2 * 20 * 16 * 4 + outside       # each layer's input
    assert checkpointed.parts["recomputed layer"].bytes == per_layer                  # in the backward pass only


def test_lora_precompute_reference_free_bf16_and_fsdp_bytes():
    lora = estimate(TINY, replace(CUDA, lora_r=2, reference="adapter"), one_block()).parts
    assert lora["weights"].bytes == TINY_PARAMS * 4 + TINY_LORA * 4
    assert lora["gradients"].bytes == TINY_LORA * 4 and lora["AdamW states"].bytes == 2 * TINY_LORA * 4
    assert lora["reference"].bytes == 0                        # the adapter disabled: no copy
    assert lora["head gradient"].bytes == 10 * 16 * 4        # a frozen head holds no weight gradient
    pre = estimate(TINY, replace(CUDA, precompute=True), replace(one_block(), data_pairs=50))
    assert pre.parts["reference"].bytes == 50 * 16           # four float32 numbers per pair
    assert pre.parts["reference copy"].bytes == TINY_PARAMS * 4 and "reference precompute" in pre.phases
    lora_pre = estimate(TINY, replace(CUDA, lora_r=2, reference="adapter", precompute=True), one_block()).parts
    assert lora_pre["reference copy"].bytes == 0               # scored with the adapter off: no copy
    assert estimate(TINY, replace(CUDA, reference="none"), one_block()).parts["reference"].bytes == 0
    bf16 = estimate(TINY, replace(CUDA, dtype="bfloat16"), one_block()).parts
    assert bf16["weights"].bytes == TINY_PARAMS * 2 and bf16["AdamW states"].bytes == 2 * TINY_PARAMS * 2
    fsdp = estimate(TINY, replace(CUDA, fsdp=True, nproc=4), one_block()).parts
    assert fsdp["AdamW states"].bytes == 2 * TINY_PARAMS * 4 // 4 and fsdp["gradients"].bytes == TINY_PARAMS
    ddp = estimate(TINY, replace(CUDA, nproc=4), one_block()).parts
    assert ddp["ddp buckets"].bytes == TINY_PARAMS * 4 and ddp["AdamW states"].bytes == 2 * TINY_PARAMS * 4


def test_length_limits_give_the_longest_pair():
    """Without data every pair is as long as the limits allow: prompt 1 and two completions of 1,023 tokens
    forward the most (2,047) under --max-length 1024; a completion limit of 256 moves the worst case to the
    longest prompt."""
    work = workload(DataProfile.from_limits(1024, 512, None), RunSettings(batch_size=2))
    assert work.blocks == (Block(1, (1023, 1023)),) * 2
    work = workload(DataProfile.from_limits(1024, 512, 256), RunSettings(batch_size=1))
    assert work.blocks == (Block(512, (256, 256)),)


def test_data_profile_shares_prompts_and_takes_the_longest_pairs():
    """Three responses to one prompt, all three pairs (a group): one block of the prompt and the three distinct
    responses; a batch of 2 pairs takes the two pairs that forward the most tokens per pair."""
    from dpokit.data.tokenization import TokenizedPair

    prompt, a, b, c = [1] * 100, [2] * 10, [3] * 20, [4] * 30
    group = [TokenizedPair(prompt, x, y, group=0) for x, y in ((a, b), (a, c), (b, c))]
    single = [TokenizedPair([5] * 50, [6] * 5, [7] * 5), TokenizedPair([5] * 10, [6] * 5, [7] * 5)]
    data = DataProfile.from_pairs(group + single, source="test")
    assert data.units[0] == Block(50, (5, 5), 1)                # 60 tokens for one pair
    assert data.units[1] == Block(100, (30, 20, 10), 3)         # 160 tokens for three: 53 per pair
    assert data.tokens == 160 + 60 + 20 and data.percentiles["prompt"][-1] == 100
    work = workload(data, RunSettings(batch_size=2))
    assert work.blocks == (Block(50, (5, 5), 1), Block(100, (30, 20), 1))   # part of the group: 2 responses
    budget = workload(data, RunSettings(batch_size=5, micro_batch_tokens=100))
    assert budget.blocks == (Block(100, (30, 20, 10), 3),)       # larger than the budget: alone
    assert budget.micro_batches == 3                              # 240 tokens in the step / 100


@pytest.mark.parametrize("text, size", [("80GB", 80 * 2**30), ("24GiB", 24 * 2**30), ("512MB", 512 * 2**20),
                                        ("1.5T", int(1.5 * 2**40)), ("16", 16 * 2**30), ("64 gb", 64 * 2**30)])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["80XB", "GB", "-4GB", "0GB", "eighty"])
def test_parse_memory_refuses_with_one_line(text):
    with pytest.raises(DPOError, match=r"^--memory .*: expected a size such as 80GB, 24GiB or 512MB$"):
        parse_memory(text)


def test_fit_picks_the_cheapest_change():
    """Long rows on a wide model: a token budget that keeps the result unchanged comes first; a budget below
    anything reachable finds nothing."""
    shape = ModelShape(model_type="qwen2", vocab=1000, hidden=256, layers=8, heads=4, kv_heads=4, head_dim=64,
                       intermediate=1024, tied=True)
    run = replace(CUDA, batch_size=8)
    data = DataProfile((Block(2000, (200, 200)),), 1, 2400, 400, 0, uniform=True)

    def work_for(settings):
        return workload(data, settings)

    work = work_for(run)
    plan = estimate(shape, run, work)
    found = fit(shape, run, work_for, int(plan.peak * 0.6))
    assert found is not None
    settings, peak = found
    assert settings.micro_batch_tokens and peak <= plan.peak * 0.6
    assert (settings.precompute, settings.dtype, settings.lora_r) == (False, "float32", 0)
    assert fit(shape, run, work_for, 2**20) is None
    bf16 = replace(run, dtype="bfloat16")
    settings, _ = fit(shape, bf16, work_for, int(estimate(shape, bf16, work_for(bf16)).peak * 0.6))
    assert "--dtype" not in settings.flags(bf16) and settings.flags(bf16)   # only what the run does not already do


def test_plan_command_with_data(tiny_model_dir, pairs_jsonl, capsys):
    code, out, err = run_cli(["plan", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--batch-size", "4",
                              "--memory", "80GB", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "predicted peak per process" in out and "prompt    tokens p50" in out and "fits in 80.00 GiB" in out
    for part in ("weights", "reference", "AdamW states", "activations", "LM head logits", "framework"):
        assert f" {part} " in out
    code, out, _ = run_cli(["plan", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--json",
                            "--memory", "1MB", "--device", "cuda"], capsys)
    plan = json.loads(out)
    assert plan["fits"] is False and plan["fix"] is None                   # nothing fits in 1 MiB
    assert plan["peak_bytes"] == plan["phases"][plan["peak_phase"]] == max(plan["phases"].values())
    assert plan["flops_per_step"] > 0 and plan["model"]["params"] > 0


def test_plan_command_suggests_flags(tiny_model_dir, pairs_jsonl, capsys):
    code, out, _ = run_cli(["plan", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--json",
                            "--device", "cuda"], capsys)
    peak = json.loads(out)["peak_bytes"]
    framework = json.loads(out)["parts"]["framework"]
    budget = framework + (peak - framework) * 0.7
    code, out, _ = run_cli(["plan", "--model", str(tiny_model_dir), "--data", str(pairs_jsonl), "--json",
                            "--device", "cuda", "--memory", f"{budget / 2**20:.3f}MB"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is False and plan["fix"] and plan["fix_peak_bytes"] <= budget


def test_folder_without_config_is_one_line(tmp_path, capsys):
    code, out, err = run_cli(["plan", "--model", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "no config.json here" in err and not out


def test_unparseable_memory_is_one_line(capsys):
    code, _, err = run_cli(["plan", "--memory", "eighty gigs"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--memory eighty gigs: expected a size" in err


def test_unknown_architecture_gives_what_it_can(tmp_path, tokenizer_dir, pairs_jsonl, capsys):
    """A model type transformers does not know: the planner says what it could not predict and gives the rest."""
    config = dict(model_type="mystery-lm", vocab_size=500, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(["plan", "--model", str(tmp_path), "--tokenizer", str(tokenizer_dir), "--data",
                              str(pairs_jsonl), "--memory", "8GB", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "not predicted: weights, gradients, AdamW states and reference: mystery-lm" in out
    assert "not predicted: activations: mystery-lm" in out and "cannot say whether it fits" in out
    assert " LM head logits " in out and " framework " in out


def test_architecture_outside_the_families_is_counted_on_meta(tmp_path):
    """GPT-2 (not a Llama-like decoder): parameters counted on the meta device, activations not predicted."""
    from transformers import GPT2Config

    from dpokit.plan import read_shape

    GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path)
    shape = read_shape(str(tmp_path))
    plan = estimate(shape, CUDA, one_block())
    assert shape.params == 300 * 32 + 1024 * 32 + 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32   # GPT-2's own count
    assert [line.split(":")[0] for line in plan.unpredicted] == ["activations"]
    assert plan.parts["weights"].bytes == shape.params * 4


def test_one_line_summary(tmp_path):
    from dpokit.config import Config

    line = one_line_summary(Config(output=str(tmp_path)), device="cpu")
    assert line.startswith("plan: peak ~") and "\n" not in line and "FLOP per step" in line
    broken = one_line_summary(Config(model=str(tmp_path / "missing"), output=str(tmp_path)))
    assert broken.startswith("plan: no prediction (") and "\n" not in broken
    line, predicted = startup_summary(Config(output=str(tmp_path)), device="cpu")
    assert line.startswith("plan: peak ~") and predicted and predicted > 100 * 2**20
    assert peak_line("cpu", predicted).startswith("peak memory: ") and "; plan " in peak_line("cpu", predicted)
    assert measured_peak_bytes("cpu") > 50 * 2**20          # this test process's own high-water mark


# ---- the benchmarks built on the plan ------------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_caps_memory_and_time():
    """A process past the memory cap is stopped and reported, never left to take the machine; one past the time
    cap is stopped too; one within both finishes."""
    scaling = _load_benchmark("scaling")
    grow = [sys.executable, "-c", "import time; blocks = []\nwhile True: blocks.append(bytearray(20 << 20)); "
                                  "time.sleep(0.01)"]
    assert scaling.run_capped(grow, 200 << 20, 60)["status"] == "over the cap"
    assert scaling.run_capped([sys.executable, "-c", "import time; time.sleep(30)"], 1 << 30, 1)["status"] == \
        "over the time cap"
    done = scaling.run_capped([sys.executable, "-c", "print('RESULT {}')"], 1 << 30, 60)
    assert done["status"] == "ok" and "RESULT" in done["output"]


def test_scaling_dry_run_writes_its_section(tmp_path):
    """`benchmarks/scaling.py --dry-run`: dpo and TRL on a tiny model and short rows, under the caps, the table in
    a RESULTS.md (other sections kept) and the plot."""
    pytest.importorskip("trl")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept\n")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "scaling.py"), "--dry-run", "--configs", "dpo,trl",
                           "--results", str(results), "--png", str(tmp_path / "scaling.png")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = results.read_text()
    assert "kept" in text and "<!-- scaling:start -->" in text and "memory cap 8 GiB" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| length") or
            line.startswith("| responses")]
    assert sorted({(r[0][2:], r[4]) for r in rows}) == [("length", "dpo"), ("length", "trl"), ("responses", "dpo"),
                                                        ("responses", "trl")]
    assert all(r[5] == "ok" for r in rows)
    assert (tmp_path / "scaling.png").stat().st_size > 1000
