"""The major model families' chat formats, exact: tokenizers of each kind built offline with the `tokenizers`
library (byte-level BPE as GPT-2 / Llama 3 / Qwen; Metaspace with byte fallback as Llama 2 / Mistral / Gemma)
and the published chat templates (tests/fixtures/chat_templates, each naming its source on its first line).

Every expected rendering below is written out by hand from the template; the ids are checked against the
tokenizer's own encoding of that text, and the log-probs against a plain forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from dpokit import evaluation, generate
from dpokit.data import formats
from dpokit.data.formats import PreferencePair
from dpokit.data.tokenization import end_of_turn_id, tokenize_pairs
from dpokit.errors import DPOError

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "chat_templates"
CORPUS = [
    "What is the capital of France? Paris. And of Japan? Tokyo is the capital of Japan.",
    "I am not sure, maybe Kyoto? You are terse. The user asks about France.",
    "get_weather city Tokyo temperature sunny function arguments name description",
] * 30

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Japan?"}]
CHOSEN = [{"role": "assistant", "content": "Tokyo is the capital of Japan."}]
REJECTED = [{"role": "assistant", "content": "I am not sure, maybe Kyoto?"}]


@dataclass
class Family:
    template: str
    kind: str                  # "byte" (byte-level BPE) or "metaspace" (SentencePiece-style, byte fallback)
    specials: list[str]
    eos: str
    bos: str | None = None     # the BOS the tokenizer adds (None: it adds none)
    pad: str | None = None
    prefix_space: bool = True  # metaspace: "▁" before the first word (Llama 2 / Mistral), not Gemma
    added: list[str] = field(default_factory=list)  # plain added tokens (Qwen3's <think>)


FAMILIES = {
    "llama3": Family("llama3", "byte", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>"], eos="<|eot_id|>", bos="<|begin_of_text|>"),
    "qwen2_5": Family("qwen2_5", "byte", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                      pad="<|endoftext|>"),
    "qwen3": Family("qwen3", "byte", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>",
                    pad="<|endoftext|>", added=["<think>", "</think>", "<tool_call>", "</tool_call>"]),
    "mistral": Family("mistral", "metaspace", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]",
                                               "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"], eos="</s>", bos="<s>"),
    "gemma": Family("gemma", "metaspace", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                    eos="<eos>", bos="<bos>", pad="<pad>", prefix_space=False),
    "phi3": Family("phi3", "metaspace", ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>",
                                         "<|end|>", "<|user|>"], eos="<|endoftext|>", bos="<s>"),
    "zephyr": Family("zephyr", "metaspace", ["<unk>", "<s>", "</s>"], eos="</s>", bos="<s>"),
}

# (prompt as the template renders it, chosen completion, the end-of-turn token) for SYSTEM + TURNS, by hand.
EXPECTED = {
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nAnd of Japan?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "Tokyo is the capital of Japan.<|eot_id|>", "<|eot_id|>"),
    "qwen2_5": ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                "<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Japan?<|im_end|>\n"
                "<|im_start|>assistant\n", "Tokyo is the capital of Japan.<|im_end|>\n", "<|im_end|>"),
    "qwen3": ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
              "<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Japan?<|im_end|>\n"
              "<|im_start|>assistant\n", "<think>\n\n</think>\n\nTokyo is the capital of Japan.<|im_end|>\n",
              "<|im_end|>"),
    "phi3": ("<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"
             "Paris.<|end|>\n<|user|>\nAnd of Japan?<|end|>\n<|assistant|>\n",
             "Tokyo is the capital of Japan.<|end|>\n<|endoftext|>", "<|end|>"),
    "zephyr": ("<|system|>\nYou are terse.</s>\n<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
               "Paris.</s>\n<|user|>\nAnd of Japan?</s>\n<|assistant|>\n",
               "Tokyo is the capital of Japan.</s>\n", "</s>"),
    # Gemma has no system role; Mistral v0.3 puts the system message into the last user turn (tests below).
    "gemma": ("<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\nParis."
              "<end_of_turn>\n<start_of_turn>user\nAnd of Japan?<end_of_turn>\n<start_of_turn>model\n",
              "Tokyo is the capital of Japan.<end_of_turn>\n", "<end_of_turn>"),
    "mistral": ("<s>[INST] What is the capital of France?[/INST] Paris.</s>[INST] And of Japan?[/INST]",
                " Tokyo is the capital of Japan.</s>", "</s>"),
}
WITH_SYSTEM = {"llama3", "qwen2_5", "qwen3", "phi3", "zephyr"}


def read_template(name: str) -> str:
    """The template file without its first line, which names the source."""
    source, _, template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8").partition("\n")
    assert source.startswith("{# source: ") and source.endswith("#}")
    return template


def build(family: Family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family.kind == "byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=family.specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
    else:
        scheme = "first" if family.prefix_space else "never"
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=family.specials))
        spec = json.loads(tok.to_str())  # add the 256 byte tokens byte fallback needs, as SentencePiece has them
        vocab = spec["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        tok = Tokenizer.from_str(json.dumps(spec))
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if family.prefix_space else []))
    tok.add_tokens(family.added)
    if family.bos is not None:
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{family.bos} $A", pair=f"{family.bos} $A $B",
                                                           special_tokens=[(family.bos, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad or family.eos)
    fast.chat_template = read_template(family.template)
    return fast


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build(family) for name, family in FAMILIES.items()}


def expected_ids(tokenizer, family: Family, text: str) -> list[int]:
    """The tokenizer's own ids of `text`, with the BOS it adds in front when the text does not start with it."""
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def one_pair(tokenizer, prompt, chosen=CHOSEN, rejected=REJECTED, tools=None):
    (pair,), report = tokenize_pairs([PreferencePair(prompt, chosen, rejected, tools=tools)], tokenizer,
                                     max_length=10**6)
    return pair, report


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_multi_turn_boundary_bos_and_end_of_turn(tokenizers, name):
    family, tokenizer = FAMILIES[name], tokenizers[name]
    prompt_text, chosen_text, end = EXPECTED[name]
    messages = ([SYSTEM] if name in WITH_SYSTEM else []) + TURNS
    pair, report = one_pair(tokenizer, messages)
    assert pair.prompt_ids == expected_ids(tokenizer, family, prompt_text)
    assert pair.prompt_ids + pair.chosen_ids == expected_ids(tokenizer, family, prompt_text + chosen_text)
    if family.bos is None:
        assert tokenizer.bos_token_id is None
    else:  # exactly one BOS, whether the template writes it, the tokenizer adds it, or both
        assert pair.prompt_ids[0] == tokenizer.bos_token_id and pair.prompt_ids.count(tokenizer.bos_token_id) == 1
    end_id = tokenizer.convert_tokens_to_ids(end)
    assert end_of_turn_id(tokenizer) == end_id
    assert pair.chosen_ids.count(end_id) == 1 and pair.rejected_ids.count(end_id) == 1
    assert (report.boundary_mismatches, report.template_mismatches, report.doubled_bos) == (0, 0, 0)
    # dpo generate / dpo eval --prompts encode a message-list prompt to the same ids
    assert generate.encode_prompts(tokenizer, [messages]) == [pair.prompt_ids]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_log_probs_equal_a_plain_forward(tokenizers, name, one_thread):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizers[name]
    pair, _ = one_pair(tokenizer, ([SYSTEM] if name in WITH_SYSTEM else []) + TURNS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    model.eval()
    scored = evaluation.dataset_logps(model, [pair])
    for completion, got in ((pair.chosen_ids, scored.chosen), (pair.rejected_ids, scored.rejected)):
        ids = torch.tensor([pair.prompt_ids + completion])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        n = len(pair.prompt_ids)
        naive = sum(logps[n - 1 + i, token].item() for i, token in enumerate(completion))
        assert got.item() == pytest.approx(naive, abs=1e-4)


def test_qwen3_keeps_the_completions_reasoning_and_drops_earlier_turns(tokenizers):
    tokenizer = tokenizers["qwen3"]
    earlier = {"role": "assistant", "content": "Paris.", "reasoning_content": "The user asks about France."}
    prompt = [SYSTEM, TURNS[0], earlier, TURNS[2]]
    chosen = [{"role": "assistant", "content": "Tokyo.", "reasoning_content": "Japan's capital is Tokyo."}]
    rejected = [{"role": "assistant", "content": "<think>\nmaybe Kyoto\n</think>\n\nKyoto."}]  # reasoning inline
    pair, report = one_pair(tokenizer, prompt, chosen, rejected)
    assert pair.prompt_ids == expected_ids(tokenizer, FAMILIES["qwen3"], EXPECTED["qwen3"][0])  # no earlier reasoning
    assert tokenizer.decode(pair.chosen_ids) == "<think>\nJapan's capital is Tokyo.\n</think>\n\nTokyo.<|im_end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "<think>\nmaybe Kyoto\n</think>\n\nKyoto.<|im_end|>\n"
    assert report.template_mismatches == 0


def test_a_template_that_renders_the_prompt_differently_is_cut_from_the_full_conversation(tokenizers):
    # Mistral v0.3 writes the system message into the last user turn: with the generation prompt that is
    # "And of Japan?", inside the full conversation no turn is last, so the system message is not shown at all.
    tokenizer = tokenizers["mistral"]
    pair, report = one_pair(tokenizer, [SYSTEM] + TURNS)
    prompt_text, chosen_text, _ = EXPECTED["mistral"]
    full = expected_ids(tokenizer, FAMILIES["mistral"], prompt_text + chosen_text)
    assert pair.prompt_ids + pair.chosen_ids == full  # training sees the full conversation
    assert pair.prompt_ids == expected_ids(tokenizer, FAMILIES["mistral"], prompt_text)
    assert tokenizer.decode(pair.chosen_ids).strip() == "Tokyo is the capital of Japan.</s>"
    assert report.template_mismatches == 1
    assert any("renders the prompt differently" in line for line in report.lines())


def test_a_template_that_refuses_the_messages_is_one_line(tokenizers):
    with pytest.raises(DPOError, match=r"refused the messages \(system/user/assistant/user\): System role not"):
        one_pair(tokenizers["gemma"], [SYSTEM] + TURNS)


def test_tools_and_tool_calls_are_rendered_by_the_template(tokenizers, tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    record = {"prompt": [{"role": "user", "content": "Weather in Tokyo?"}], "tools": tools,
              "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
              "rejected": [{"role": "assistant", "content": "It is sunny."}]}
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (loaded,), _ = formats.load_pairs(str(data))
    assert loaded.tools == tools
    tokenizer = tokenizers["qwen2_5"]
    pair, report = one_pair(tokenizer, loaded.prompt, loaded.chosen, loaded.rejected, tools=loaded.tools)
    prompt = tokenizer.decode(pair.prompt_ids)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                             "assistant.\n\n# Tools\n") and json.dumps(tools[0]) in prompt
    assert prompt.endswith("<|im_start|>user\nWeather in Tokyo?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(pair.chosen_ids) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call><|im_end|>\n')
    assert tokenizer.decode(pair.rejected_ids) == "It is sunny.<|im_end|>\n"
    assert report.template_mismatches == 0


def test_inspect_shows_tools_tool_calls_and_reasoning(tokenizers, tmp_path):
    from dpokit.data.inspect import inspect

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    record = {"prompt": [{"role": "user", "content": "Weather in Tokyo?"}],
              "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
              "chosen": [{"role": "assistant", "content": None, "tool_calls": [call],
                          "reasoning_content": "Look it up."}],
              "rejected": [{"role": "assistant", "content": "It is sunny."}]}
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    text = "\n".join(inspect(str(data)))
    assert "  tools:    get_weather" in text
    assert '┃[assistant] <think>Look it up.</think> [tool call get_weather({"city": "Tokyo"})]' in text
    rendered = "\n".join(inspect(str(data), tokenizer=tokenizers["qwen3"]))
    assert '<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}' in rendered
    assert "┃<think>\\nLook it up.\\n</think>" in rendered
