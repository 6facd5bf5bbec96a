"""The model card: `OUTPUT/model/README.md` in the Hugging Face format, written at the end of training.

A card is YAML front matter (the metadata the Hub indexes: `base_model`, `library_name`, `tags`, `datasets`)
followed by markdown for people: how the model was trained (loss and parameters), on what data (files, pair,
truncation and skip counts), how it scored, and the `dpo train` command line that reproduces it. SFT and
unpaired (KTO) runs are described in their own terms: records or labelled examples, not preference pairs. A
vision-language model's card names its processor (read from the saved `processor_config.json`), tags the Hub's
`image-text-to-text` pipeline and says how to load the folder (`AutoProcessor`, `AutoModelForImageTextToText`).
See https://huggingface.co/docs/hub/model-cards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .data import mixture
from .report import HELD_OUT as METRICS, summary_table



@dataclass
class CardInfo:
    """What a card says. Plain values: the loop fills it from `Config`, the data counts and the final metrics."""

    name: str                           # the card's title, e.g. the output folder's name
    base_model: str                     # hub name or folder the policy started from
    base_is_preset: bool                # a dpokit preset (random init): not a real base model on the Hub
    losses: Sequence[str]
    loss_params: Mapping[str, Any]
    data: Sequence[str]                 # --data (and --eval-data) as given: files, folders or hub dataset names
    counts: Mapping[str, int]           # train_pairs, eval_pairs, dropped_pairs, truncated_pairs, ...
    command: str                        # the `dpo train ...` line that reproduces the run
    eval_before: Mapping[str, float] = field(default_factory=dict)
    eval_after: Mapping[str, float] = field(default_factory=dict)
    final_train: Mapping[str, float] = field(default_factory=dict)
    steps: int = 0
    tags: Sequence[str] = ()            # extra Hub tags, e.g. "lora"
    rows: Sequence[Mapping[str, Any]] = ()  # metrics.jsonl rows, for the run summary table
    quantization: str | None = None     # how the base was stored while the adapter trained (`Quantization.describe`)
    python_losses: Sequence[str] = ()   # losses registered from Python code: no `dpo train` command can name them
    processor: str | None = None        # a vision-language model's processor, e.g. "LlavaProcessor (CLIPImageProcessor)"


def hub_datasets(data: Sequence[str]) -> list[str]:
    """The data sources that name Hub datasets (each source of a `--data a:0.7,b:0.3` mixture on its own): not
    the built-in task and not a local file or folder."""
    sources = [source.path for d in data if d != "synthetic" for source in mixture.parse(d)]
    return [path for path in sources if not Path(path).exists()]


def front_matter(info: CardInfo) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if not info.base_is_preset:
        meta["base_model"] = info.base_model
    meta["library_name"] = "dpokit"
    if info.processor:
        meta["pipeline_tag"] = "image-text-to-text"
    meta["tags"] = list(dict.fromkeys(["dpokit", "dpo", *info.losses, *info.tags, *_quantization_tags(info)]))
    datasets = hub_datasets(info.data)
    if datasets:
        meta["datasets"] = datasets
    return meta


def render_card(info: CardInfo) -> str:
    """The card's text: `---`, YAML metadata, `---`, then markdown."""
    base = (f"the dpokit preset `{info.base_model}` (random init)" if info.base_is_preset
            else f"`{info.base_model}`" if Path(info.base_model).exists()
            else f"[{info.base_model}](https://huggingface.co/{info.base_model})")
    params = ", ".join(f"{k}={v}" for k, v in info.loss_params.items())
    kind = _data_kind(info) + (" with images" if info.processor and info.counts.get("images") else "")
    unit = "pairs" if kind.startswith("preference pairs") else "examples"
    lines = [
        "---", yaml.safe_dump(front_matter(info), sort_keys=False).rstrip(), "---", "",
        f"# {info.name}", "",
        f"Fine-tuned from {base} on {kind} with [dpokit](https://pypi.org/project/dpokit/) "
        f"{_version()}.", "",
        "## Training", "",
        f"- loss: {' + '.join(f'`{name}`' for name in info.losses)}" + (f" ({params})" if params else ""),
        f"- optimizer steps: {info.steps}",
        *([f"- processor: `{info.processor}`, saved with the model"] if info.processor else []),
        *([f"- base weights: {info.quantization}"] if info.quantization else []), "",
        "## Data", "",
        *[f"- `{d}`" for d in info.data], "",
        f"| count | {unit} |", "|---|---|",
        *[f"| {name.replace('_', ' ').replace('pairs', unit)} | {value} |" for name, value in info.counts.items()],
        "",
    ]
    lines += _results(info)
    if info.rows:
        lines += ["## Run summary", "", summary_table([("this run", info.rows)]).rstrip(), ""]
    lines += _use(info)
    lines += ["## Reproduce", "", *_reproduce(info), ""]
    return "\n".join(lines)


def _data_kind(info: CardInfo) -> str:
    """What the run trained on, by its losses: SFT records, unpaired labelled examples (KTO) or pairs."""
    if all(name == "sft" for name in info.losses):
        return "SFT records (prompt and completion)"
    if "kto" in info.losses:
        return "desirable / undesirable examples (unpaired)"
    return "preference pairs"


def _reproduce(info: CardInfo) -> list[str]:
    """The command in a bash block; with a loss registered from Python, what that command needs first."""
    block = ["```bash", info.command, "```"]
    if not info.python_losses:
        return block
    names = ", ".join(f"`{name}`" for name in info.python_losses)
    return [f"The loss {names} was registered from Python code (`dpokit.losses.register`), so `dpo train` "
            "alone cannot name it: import the module that registers it, then call `dpokit.train` with these "
            "settings (as flags:)", "", *block]


def _use(info: CardInfo) -> list[str]:
    """How to load a vision-language model's folder: its auto classes (a text model's are the usual ones)."""
    if not info.processor:
        return []
    return ["## Use", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
            'model = AutoModelForImageTextToText.from_pretrained("path/to/this/folder")',
            'processor = AutoProcessor.from_pretrained("path/to/this/folder")', "```", ""]


def saved_processor(model_dir: str | Path) -> str | None:
    """The processor a saved folder holds and its image processor, e.g. "LlavaProcessor (CLIPImageProcessor)";
    None for a tokenizer alone. transformers 5 writes both in `processor_config.json`; earlier versions wrote the
    image processor's `preprocessor_config.json`, naming the processor in it."""
    for file in ("processor_config.json", "preprocessor_config.json"):
        path = Path(model_dir) / file
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            image = config.get("image_processor", config).get("image_processor_type")
            name = str(config.get("processor_class") or image)
            return f"{name} ({image})" if image and name != image else name
    return None


def write_card(model_dir: str | Path, info: CardInfo) -> Path:
    """`model_dir/README.md`; the processor, when the card does not name one, is the one saved in the folder."""
    if info.processor is None:
        info = replace(info, processor=saved_processor(model_dir))
    path = Path(model_dir) / "README.md"
    path.write_text(render_card(info), encoding="utf-8")
    return path


def _quantization_tags(info: CardInfo) -> list[str]:
    """QLoRA (a 4-bit base, arXiv 2305.14314) is what the Hub's users search for; 8 bits is tagged as such."""
    if not info.quantization:
        return []
    bits = info.quantization.split(",")[0].split()[0]  # "4-bit" or "8-bit"
    return ["qlora", bits, "bitsandbytes"] if bits == "4-bit" else [bits, "bitsandbytes"]


def _results(info: CardInfo) -> list[str]:
    if not (info.eval_after or info.final_train):
        return []
    lines = ["## Results", "", "| metric | held-out, before | held-out, after | train, last log step |",
             "|---|---|---|---|"]
    sft = all(name == "sft" for name in info.losses)
    for name in METRICS:
        cells = [_number(source.get(name)) for source in (info.eval_before, info.eval_after, info.final_train)]
        if any(cell != "-" for cell in cells):
            shown = "loss (NLL per token)" if sft and name == "loss" else name
            lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _version() -> str:
    try:
        return metadata.version("dpokit")
    except metadata.PackageNotFoundError:  # running from a source tree that was not installed
        return "(source)"
