"""The model card: YAML front matter the Hub can index, then markdown that says how the model was made."""

from __future__ import annotations

import shlex

import yaml

from dpokit.config import Config
from dpokit.model_card import CardInfo, hub_datasets, render_card, write_card


def parse_card(text: str) -> tuple[dict, str]:
    """Split a card the way the Hub does: `---\\n<yaml>\\n---\\n<markdown>`."""
    assert text.startswith("---\n")
    meta, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(meta), body


def make_info(tmp_path, **changes) -> CardInfo:
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("{}\n")
    values = dict(
        name="beta0.1", base_model="my-org/sft-model", base_is_preset=False, losses=["sigmoid"],
        loss_params={"beta": 0.1, "label_smoothing": 0.0}, data=[str(data_file), "Anthropic/hh-rlhf"],
        counts={"train_pairs": 40, "eval_pairs": 8, "truncated_pairs": 3}, steps=12,
        command="dpo train --model my-org/sft-model --data pairs.jsonl --lr 5e-07",
        eval_before={"rewards/accuracies": 0.5, "loss": 0.6931}, eval_after={"rewards/accuracies": 0.75, "loss": 0.61},
        final_train={"loss": 0.58}, tags=["lora"])
    return CardInfo(**{**values, **changes})


def test_card_front_matter_names_base_model_library_tags_and_hub_datasets(tmp_path):
    meta, body = parse_card(render_card(make_info(tmp_path)))
    assert meta == {"base_model": "my-org/sft-model", "library_name": "dpokit",
                    "tags": ["dpokit", "dpo", "sigmoid", "lora"],
                    "datasets": ["Anthropic/hh-rlhf"]}  # the local file is not a Hub dataset
    assert body.lstrip().startswith("# beta0.1")
    assert "[my-org/sft-model](https://huggingface.co/my-org/sft-model)" in body


def test_card_body_has_loss_data_counts_metrics_and_command(tmp_path):
    _, body = parse_card(render_card(make_info(tmp_path)))
    assert "`sigmoid` (beta=0.1, label_smoothing=0.0)" in body
    assert f"- `{tmp_path / 'pairs.jsonl'}`" in body and "- `Anthropic/hh-rlhf`" in body
    assert "| train pairs | 40 |" in body and "| truncated pairs | 3 |" in body
    assert "| rewards/accuracies | 0.5000 | 0.7500 | - |" in body
    assert "| loss | 0.6931 | 0.6100 | 0.5800 |" in body
    assert "```bash\ndpo train --model my-org/sft-model --data pairs.jsonl --lr 5e-07\n```" in body


def test_preset_base_model_is_not_claimed_as_a_hub_model(tmp_path):
    meta, body = parse_card(render_card(make_info(tmp_path, base_model="tiny", base_is_preset=True, data=["synthetic"],
                                                  tags=[])))
    assert "base_model" not in meta and "datasets" not in meta
    assert "preset `tiny` (random init)" in body


def test_write_card_puts_readme_in_the_model_folder(tmp_path):
    path = write_card(tmp_path, make_info(tmp_path))
    assert path == tmp_path / "README.md"
    assert parse_card(path.read_text(encoding="utf-8"))[0]["library_name"] == "dpokit"


def test_card_command_rebuilds_the_config():
    """The command line written in the card parses back to the same Config (what `to_args` promises)."""
    cfg = Config(model="my-org/sft-model", data="my pairs.jsonl", beta=0.25, lr=5e-7, prefix_sharing=False,
                 packing=False, max_completion_length=100, eval_data='held out.jsonl', report_to="tensorboard,wandb", loss="sigmoid,sft",
                 loss_weights="1,0.5")
    command = shlex.join(["dpo", "train", *cfg.to_args()])
    assert Config.from_args(shlex.split(command)[2:]) == cfg


def test_each_hub_source_of_a_data_mixture_is_named_on_its_own(tmp_path):
    local = tmp_path / "mine.jsonl"
    local.write_text("", encoding="utf-8")
    assert hub_datasets([f"Anthropic/hh-rlhf:0.7,{local}:0.3,HuggingFaceH4/ultrafeedback_binarized"]) == \
        ["Anthropic/hh-rlhf", "HuggingFaceH4/ultrafeedback_binarized"]
