"""One typed, validated `Config` that the CLI, YAML files and Python code all fill.

Every field is a flag (`lr` -> `--lr`, `max_prompt_length` -> `--max-prompt-length`) and a YAML key (either
spelling). The command line wins over the YAML file, the YAML file over the defaults. Unknown YAML keys and
invalid values are rejected with one line that names the key or flag; all problems are reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DPOError


DEFAULT_LR = 1e-6  # TRL's DPOConfig default, right for fine-tuning pretrained models
SYNTHETIC_LR = 1e-4  # the built-in task trains a small model from random init
SFT_LR = 2e-5  # TRL's SFTConfig default: supervised fine-tuning moves further than DPO
SFT_DEFAULTS = {"loss": "sft", "output": "runs/sft"}  # what `dpo sft` changes; the data format is detected


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    """Everything a `dpo train` run needs. Field docs double as `--help` text."""

    # --- model ---------------------------------------------------------------------------------------------
    model: str = _opt("tiny", "model: a preset (tiny, seed), a local Hugging Face folder, or a hub name")
    tokenizer: str | None = _opt(None, "tokenizer folder or hub name (default: the model's own)")
    dtype: str = _opt("float32", "weights and compute dtype", choices=("float32", "bfloat16"))
    device: str = _opt("auto", "device: auto, cpu, cuda, cuda:N")
    attn_implementation: str = _opt("auto", "attention kernel passed to transformers: auto (flex_attention on CUDA "
                                            "with triton, else sdpa), sdpa, eager, flex_attention, "
                                            "flash_attention_2")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass to save memory")
    compile: bool = _opt(False, "torch.compile the policy (opt-in)")
    freeze_vision: bool = _opt(True, "vision-language models: the vision tower gets no gradient (--no-freeze-vision "
                                     "trains it too)")

    # --- data ----------------------------------------------------------------------------------------------
    data: str = _opt("synthetic", "training data: 'synthetic', a JSON/JSONL/Parquet/CSV file or folder, or a hub "
                                  "dataset; several mixed: a.jsonl:0.7,b.parquet:0.3 (a weight is the share of that "
                                  "source's pairs taken, drawn by --seed; 2 takes each twice; a YAML list in --config)")
    data_split: str = _opt("train", "split to read from --data when it has several")
    eval_data: str | None = _opt(None, "held-out data (default: --eval-fraction of --data)")
    eval_split: str | None = _opt(None, "split to read from --eval-data (or from --data when given)")
    eval_fraction: float = _opt(0.1, "share of --data held out for evaluation when no --eval-data (0 turns it off)")
    format: str | None = _opt(None, "force a data format instead of detecting it",
                              choices=("explicit", "implicit", "conversational", "ranked", "unpaired", "sft"))
    columns: str | None = _opt(None, "rename columns, e.g. chosen=good,rejected=bad,prompt=question")
    pairs: str = _opt("best-worst", "how to pair several ranked responses per prompt",
                      choices=("best-worst", "all", "adjacent"))
    max_pairs: int | None = _opt(None, "use at most this many pairs from --data")
    stream_data: bool = _opt(False, "for data larger than memory: read and tokenize --data in shards into the cache and "
                                    "train from there, memory-mapped")
    skip_invalid: bool = _opt(False, "skip malformed records (counted and reported) instead of stopping")
    max_length: int = _opt(1024, "max tokens of prompt + completion")
    max_prompt_length: int | None = _opt(512, "max prompt tokens (truncated per --truncation-mode)")
    max_completion_length: int | None = _opt(None, "max completion tokens (completions are cut at the end)")
    truncation_mode: str = _opt("keep_end", "which part of a long prompt to keep", choices=("keep_end", "keep_start"))
    cache: bool = _opt(True, "cache tokenized data on disk (--no-cache redoes it)")
    cache_dir: str | None = _opt(None, "where tokenized data is cached (default: $DPOKIT_CACHE_DIR or ~/.cache/dpokit/data)")

    # --- loss ----------------------------------------------------------------------------------------------
    loss: str = _opt("sigmoid", "loss name, or several comma-separated (see README's loss table)")
    loss_weights: str | None = _opt(None, "comma-separated weights for several losses (default: all 1)")
    beta: float = _opt(0.1, "DPO beta: strength of the KL penalty toward the reference")
    label_smoothing: float = _opt(0.0, "assumed label-flip rate (conservative DPO, robust DPO)")
    rpo_alpha: float | None = _opt(None, "weight of the NLL term on chosen completions (RPO)")
    use_weighting: bool = _opt(False, "WPO: weight each pair by its on-policy probability")
    ld_alpha: float | None = _opt(None, "LD-DPO: weight of the log-probs of tokens past the shorter completion")
    f_divergence: str = _opt("reverse_kl", "f-DPO divergence",
                             choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
    f_alpha_divergence_coef: float = _opt(0.5, "alpha of the alpha-divergence (f-DPO; TRL's default 0.5)")
    discopop_tau: float = _opt(0.05, "temperature of the DiscoPOP loss")
    use_margin: bool = _opt(False, "use per-pair margin/score fields as an offset (ODPO-style margin-aware DPO)")
    simpo_gamma: float = _opt(0.5, "SimPO target reward margin gamma (note: gamma, not gamma/beta)")
    orpo_lambda: float = _opt(0.1, "ORPO weight of the odds-ratio term")
    cpo_alpha: float = _opt(1.0, "CPO weight of the NLL term on chosen")
    dpop_lambda: float = _opt(50.0, "DPOP (--loss dpop) weight of the penalty on the chosen log-ratio falling below "
                                    "zero (the paper's 50)")
    alphapo_alpha: float = _opt(0.0, "AlphaPO (--loss alphapo) reward shape alpha (TRL's `alpha`; 0 is SimPO; TRL's "
                                     "recipe for Mistral-Instruct uses 0.25)")
    astar_po_beta1: float = _opt(0.5, "A*-PO (--loss astar_po) temperature beta1 of the value estimate "
                                      "V(x) = beta1 log mean exp(r/beta1) over the pair's two rewards")
    tpo_alpha: float = _opt(1.0, "TPO (--loss tpo, tpo-l) weight of the NLL term on the gold response (the `reference` "
                                  "or `gold` column; the authors' and TRL's 1.0)")
    tpo_l_gamma: float = _opt(0.5, "TPO-L (--loss tpo-l) target reward margin gamma on average log-probs (TRL's 0.5)")
    kto_desirable_weight: float = _opt(1.0, "KTO weight of desirable (label true) completions")
    kto_undesirable_weight: float = _opt(1.0, "KTO weight of undesirable (label false) completions")

    # --- reference -----------------------------------------------------------------------------------------
    ref_model: str | None = _opt(None, "reference model folder (default: a frozen copy of the starting policy)")
    precompute_ref: bool = _opt(False, "compute reference log-probs once before training, then free the reference")
    ref_sync_every: int | None = _opt(None, "TR-DPO: update the reference from the policy every N steps")
    ref_sync_alpha: float = _opt(1.0, "TR-DPO: ref = a*policy + (1-a)*ref at each sync (1 = hard copy)")
    ref_update: str = _opt("start", "the reference: the starting model throughout (start); BEMA, the policy's "
                                    "bias-corrected moving average (bema, arXiv 2508.00180); dpo online also takes "
                                    "round (the policy at the start of each round)", choices=("start", "bema", "round"))
    bema_update_every: int = _opt(400, "--ref-update bema: move the reference every N steps (TRL's update_freq)")
    bema_ema_power: float = _opt(0.5, "--ref-update bema: EMA weight beta_t = (lag + multiplier t)^-power (kappa)")
    bema_bias_power: float = _opt(0.2, "--ref-update bema: bias correction alpha_t = (lag + multiplier t)^-power "
                                       "(eta; 0 gives the plain EMA's correction of 1)")
    bema_lag: float = _opt(10.0, "--ref-update bema: the schedules' offset rho")
    bema_multiplier: float = _opt(1.0, "--ref-update bema: the schedules' step multiplier gamma")

    # --- LoRA ----------------------------------------------------------------------------------------------
    lora_r: int = _opt(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: float = _opt(16.0, "LoRA alpha")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    lora_target_modules: str = _opt("all-linear", "comma-separated module names for LoRA, or all-linear")
    lora_adapter: str | None = _opt(None, "start from this existing PEFT adapter folder")
    merge_lora: bool = _opt(False, "also save the LoRA adapter merged into the base model")

    # --- quantized base (QLoRA) ----------------------------------------------------------------------------
    load_in_4bit: bool = _opt(False, "QLoRA: load the base model's linear layers in 4 bits (bitsandbytes) and train "
                                     "the LoRA adapter on them; needs --lora-r or --lora-adapter")
    load_in_8bit: bool = _opt(False, "load the base model's linear layers in 8 bits (bitsandbytes LLM.int8()) and "
                                     "train the LoRA adapter on them; needs --lora-r or --lora-adapter")
    bnb_4bit_quant_type: str = _opt("nf4", "4-bit data type of --load-in-4bit: nf4 (QLoRA's NormalFloat) or fp4",
                                    choices=("nf4", "fp4"))
    bnb_4bit_double_quant: bool = _opt(False, "--load-in-4bit: quantize the per-block scales too (QLoRA's double "
                                              "quantization, about 0.4 bits per weight less)")
    quantize_embeddings: bool = _opt(False, "--load-in-4bit: store the input embeddings and LM head in 4 bits too "
                                            "(frozen under LoRA, dequantized a slice of rows at a time); saves most "
                                            "of their memory on large vocabularies, at 4-bit precision for the head")

    # --- layout and speed ----------------------------------------------------------------------------------
    prefix_sharing: bool = _opt(True, "forward each prompt once for its chosen and rejected completions")
    packing: bool = _opt(True, "pack several pairs per row, no padding (needs --prefix-sharing)")
    max_tokens_per_batch: int | None = _opt(None, "tokens per packed row: a batch's pairs are packed into rows of "
                                                  "this many tokens with dense masks (default: one row without "
                                                  "padding, attended block by block with sdpa)")
    logprob_chunk_size: int = _opt(512, "completion tokens per LM-head chunk (bounds logits memory)")
    lean_host_memory: bool = _opt(True, "on CPU, return freed memory to the OS during training (lower peak RSS; "
                                        "glibc only)")
    lean_layers: bool = _opt(True, "Llama, Mistral and Qwen2/3 norm, rotary and SwiGLU layers with fewer passes "
                                   "over memory, and LoRA's product added in place (same numbers; not with "
                                   "--compile)")

    # --- optimisation --------------------------------------------------------------------------------------
    lr: float | None = _opt(None, f"AdamW learning rate (default: {DEFAULT_LR}; {SFT_LR} with --loss sft; "
                                        f"{SYNTHETIC_LR} on the synthetic task)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    batch_size: int = _opt(8, "pairs per optimizer micro-step, per process")
    grad_accum: int = _opt(1, "micro-steps per optimizer step")
    micro_batch_tokens: int | None = _opt(None, "split each step's pairs (--batch-size x --grad-accum per process) "
                                                "into micro-batches of at most this many forwarded tokens instead "
                                                "of --grad-accum equal ones (same step, same loss)")
    epochs: float = _opt(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = _opt(None, "optimizer steps to run (overrides --epochs)")
    warmup_steps: int = _opt(0, "linear warmup steps")
    lr_schedule: str = _opt("linear", "decay after warmup", choices=("linear", "cosine", "constant"))
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 turns it off)")
    seed: int = _opt(42, "seed for model init, data order and dropout")

    # --- logging, eval, checkpoints ------------------------------------------------------------------------
    output: str = _opt("runs/dpo", "output folder")
    log_every: int = _opt(1, "log training metrics every N steps")
    eval_every: int | None = _opt(None, "evaluate every N steps, besides before and after training (default: ten "
                                        "times in a run of 20 steps or more, so the curves show held-out progress)")
    eval_batch_size: int | None = _opt(None, "pairs per eval batch (default: --batch-size)")
    save_every: int | None = _opt(None, "save a resumable checkpoint every N steps (and at the end)")
    save_total_limit: int | None = _opt(None, "keep only the newest K checkpoints")
    resume: str | None = _opt(None, "resume from the latest checkpoint in --output, or from PATH; 'auto': resume if "
                                    "--output holds a complete checkpoint, else start fresh (one command line for "
                                    "the first start and every torchrun --max-restarts restart)", nargs="?",
                              const="latest")
    overwrite_output: bool = _opt(False, "replace the run already in --output (its checkpoints, model and metrics) "
                                         "instead of stopping")
    max_bad_steps: int = _opt(5, "stop after K consecutive steps with a non-finite loss or gradient")
    health_checks: bool = _opt(True, "watch the metrics for a run going wrong (no learning, likelihood displacement, "
                                     "length hacking, exploding KL, gradient spikes, NaN) and say so once each in "
                                     "the log, metrics.jsonl (health/...) and summary.md")
    num_workers: int = _opt(0, "dataloader worker processes")
    report_to: str = _opt("none", "metric sinks besides metrics.jsonl: none, tensorboard, wandb (comma-separated)")
    fsdp: bool = _opt(False, "shard the model with FSDP2 under torchrun (default: DDP)")
    progress: bool = _opt(True, "show a progress bar (off automatically when stderr is not a terminal)")

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = SYNTHETIC_LR if self.data == "synthetic" else SFT_LR if self.loss == "sft" else DEFAULT_LR
        problems = list(self._problems())
        if problems:
            raise DPOError("; ".join(problems))

    def _problems(self) -> typing.Iterator[str]:
        for name in ("lr", "beta", "batch_size", "grad_accum", "max_length", "log_every", "logprob_chunk_size"):
            if getattr(self, name) <= 0:
                yield f"--{_flag(name)} must be positive, got {getattr(self, name)}"
        for name in ("max_steps", "max_prompt_length", "max_completion_length", "eval_every", "save_every",
                     "save_total_limit", "max_pairs", "max_tokens_per_batch", "eval_batch_size", "ref_sync_every",
                     "micro_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                yield f"--{_flag(name)} must be positive, got {value}"
        if self.epochs <= 0:
            yield f"--epochs must be positive, got {self.epochs}"
        if not 0.0 <= self.eval_fraction < 1.0:
            yield f"--eval-fraction must be in [0, 1), got {self.eval_fraction}"
        if not 0.0 <= self.label_smoothing <= 0.5:
            yield f"--label-smoothing must be in [0, 0.5], got {self.label_smoothing}"
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            yield f"--ld-alpha must be in [0, 1], got {self.ld_alpha}"
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0 or self.num_workers < 0:
            yield "--warmup-steps, --max-grad-norm, --weight-decay and --num-workers must not be negative"
        if not 0.0 < self.ref_sync_alpha <= 1.0:
            yield f"--ref-sync-alpha must be in (0, 1], got {self.ref_sync_alpha}"
        if self.bema_update_every < 1:
            yield f"--bema-update-every must be at least 1, got {self.bema_update_every}"
        if not (self.bema_lag > 0 and self.bema_multiplier >= 0 and self.bema_ema_power >= 0
                and self.bema_bias_power >= 0):
            yield "--bema-lag must be positive and --bema-multiplier, --bema-ema-power, --bema-bias-power not negative"
        if self.lora_r < 0:
            yield f"--lora-r must be >= 0, got {self.lora_r}"
        if not 0.0 <= self.lora_dropout < 1.0:
            yield f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"
        if self.resume == "auto" and not self.save_every:
            yield "--resume auto needs --save-every N: without checkpoints every restart would start over"
        if self.overwrite_output and self.resume is not None:
            yield "--overwrite-output and --resume contradict each other: replace the run in --output, or continue it"
        if self.merge_lora and not (self.lora_r or self.lora_adapter):
            yield "--merge-lora needs LoRA training (--lora-r N or --lora-adapter PATH)"
        yield from self._quantization_problems()
        unknown = [t for t in self.report_to.split(",") if t.strip() not in ("none", "tensorboard", "wandb")]
        if unknown:
            yield f"--report-to takes none, tensorboard, wandb (comma-separated), got {', '.join(unknown)!r}"
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                yield f"--{_flag(f.name)} must be one of {', '.join(choices)}, got {value!r}"

    def _quantization_problems(self) -> typing.Iterator[str]:
        if self.load_in_4bit and self.load_in_8bit:
            yield "--load-in-4bit and --load-in-8bit contradict each other: pick one"
        quantized = "--load-in-4bit" if self.load_in_4bit else "--load-in-8bit" if self.load_in_8bit else None
        if quantized and not (self.lora_r or self.lora_adapter):
            yield (f"{quantized} needs LoRA (--lora-r N or --lora-adapter PATH): quantized weights cannot be "
                   "trained, only an adapter on them")
        if quantized and self.fsdp:
            yield (f"{quantized} does not work with --fsdp (FSDP2 cannot shard bitsandbytes' packed weights); "
                   "drop --fsdp to train with DDP, each process holding the whole quantized base")
        if self.quantize_embeddings and not self.load_in_4bit:
            yield "--quantize-embeddings stores the embeddings in 4 bits beside a 4-bit base: add --load-in-4bit"
        if not self.load_in_4bit and (self.bnb_4bit_double_quant or self.bnb_4bit_quant_type != "nf4"):
            yield "--bnb-4bit-quant-type and --bnb-4bit-double-quant set up --load-in-4bit; add it or drop them"

    @property
    def loss_names(self) -> list[str]:
        return [name.strip() for name in self.loss.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_args(self) -> list[str]:
        """The `dpo train` flags that rebuild this Config (`Config.from_args(cfg.to_args()) == cfg`): every
        field that differs from its default, so a run's command line can be written down and re-run.

        One setting has no flag spelling: `max_prompt_length=None` (no prompt limit, possible from Python only)
        is left out, so the command falls back to the default limit.
        """
        args: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, bool):
                args.append(f"--{'' if value else 'no-'}{_flag(f.name)}")
            elif value is not None:
                args += [f"--{_flag(f.name)}", str(value)]
        return args

    # --- construction from YAML and the command line -------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Config:
        """Build from a YAML file; `overrides` (already typed) win over the file."""
        return cls(**{**_read_yaml(path), **overrides})

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Config:
        """Build from `dpo train` arguments (with `--config FILE.yaml` underneath)."""
        parser = argparse.ArgumentParser(prog="dpo train")
        add_arguments(parser)
        return from_namespace(parser.parse_args(argv))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; the type argparse converts a flag's text to."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint  # type: ignore[no-any-return]


def _none_or(kind: type) -> Any:
    """An argparse type that reads "none" as None (for limits that are on by default)."""

    def convert(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return convert


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field. Defaults are left unset (SUPPRESS) so that YAML values are not overridden."""
    parser.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file (flags win)")
    add_field_arguments(parser, FIELDS)


def add_field_arguments(parser: argparse.ArgumentParser, names: Iterable[str], *, with_defaults: bool = False,
                        ) -> None:
    """Flags for the Config fields `names`, typed and described as in `dpo train`. Without `with_defaults` an
    unset flag is absent from the namespace (so YAML values are not overridden); with it, it holds the default."""
    for name in names:
        f = FIELDS[name]
        kind = _base_type(f.type)
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # a help that explains its default says it better than the value
            help_text += f" (default: {f.default})"
        flag = f"--{_flag(f.name)}"
        default = f.default if with_defaults else argparse.SUPPRESS
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            if f.default is not None and "None" in str(f.type) and kind in (int, float):
                kind = _none_or(kind)  # e.g. --max-prompt-length none turns the limit off
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text,
                                choices=f.metadata.get("choices"), nargs=f.metadata.get("nargs"),
                                const=f.metadata.get("const"), metavar=None if f.metadata.get("choices") else f.name.upper())


def from_namespace(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Config:
    """Config from parsed flags: `defaults` (a subcommand's, e.g. SFT_DEFAULTS), then the YAML file (if
    `--config`), then the flags on top."""
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    base = _read_yaml(args.config) if getattr(args, "config", None) else {}
    return Config(**{**(defaults or {}), **base, **given})


def check_settings(args: argparse.Namespace) -> None:
    """Validate the Config fields among a command's flags (`dpo eval --beta`, `dpo data inspect --max-length`)
    by the rules and with the messages of `dpo train`, so no command accepts a value another refuses."""
    Config(**{k: v for k, v in vars(args).items() if k in FIELDS and v is not None})


def _read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DPOError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # yaml's messages span lines
        raise DPOError(f"{path}{where}: not valid YAML ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise DPOError(f"{path}: expected a mapping of setting: value, got {type(loaded).__name__}")
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise DPOError(f"{path}: unknown setting {key!r} (see `dpo train --help` for the list)")
        values[name] = _coerce(path, key, FIELDS[name], _data_sources(path, value) if name == "data" else value)
    return values


def _data_sources(path: Path, value: Any) -> Any:
    """A YAML list or mapping of data sources as `--data` text: `[a.jsonl: 0.7, {path: b.parquet, weight: 0.3},
    c.csv]` or `{a.jsonl: 0.7, b.parquet: 0.3}` -> "a.jsonl:0.7,b.parquet:0.3,c.csv"."""
    if isinstance(value, dict):
        value = [{source: weight} for source, weight in value.items()]
    if not isinstance(value, list):
        return value
    items = []
    for item in value:
        if isinstance(item, dict) and "path" in item and set(item) <= {"path", "weight"}:
            item = f"{item['path']}:{item.get('weight', 1)}"
        elif isinstance(item, dict) and len(item) == 1:
            (source, weight), = item.items()
            item = f"{source}:{weight}"
        if not isinstance(item, str):
            raise DPOError(f"{path}: setting 'data': a source is PATH, PATH:WEIGHT, {{PATH: WEIGHT}} or {{path: PATH, "
                           f"weight: WEIGHT}}, got {item!r}")
        items.append(item)
    return ",".join(items)


def _coerce(path: Path, key: Any, f: dataclasses.Field[Any], value: Any) -> Any:
    """Check a YAML value against the field's type; YAML's own typing (1e-6 is a str in YAML 1.1) is forgiven."""
    kind = _base_type(f.type)
    if value is None:
        if f.default is None:
            return None
        raise DPOError(f"{path}: setting {key!r} must not be empty")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value) if not isinstance(value, list) else value
    elif kind is str and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise DPOError(f"{path}: setting {key!r} must be {kind.__name__}, got {value!r}")
