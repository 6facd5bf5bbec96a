"""Load the policy, reference and tokenizer: named presets or any Hugging Face causal LM; wrap, save, merge LoRA.

Presets build a random-init Llama in memory (nothing downloaded). `seed` is the tutorial's exact
`LlamaConfig(vocab_size=32, hidden_size=512, num_attention_heads=4, num_key_value_heads=4)` with every other
default; `tiny` is the same family, shallow and narrow enough to train on a laptop CPU in seconds.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import host_memory, lean_layers, quantized_tables
from .accelerator import choose_attention
from .data import synthetic
from .errors import DPOError, TrainingFailure, import_extra

SYNTHETIC_VOCAB = synthetic.VOCAB  # presets are sized for the built-in task

PRESETS: dict[str, dict[str, Any]] = {
    # The tutorial's model: LlamaConfig defaults (32 layers, intermediate 11008) apart from the four fields it set.
    "seed": dict(vocab_size=SYNTHETIC_VOCAB, hidden_size=512, num_attention_heads=4, num_key_value_heads=4),
    # Same width and heads, 2 layers and a 1024-wide MLP: ~6M parameters, fast on 2 CPU cores.
    "tiny": dict(vocab_size=SYNTHETIC_VOCAB, hidden_size=512, num_attention_heads=4, num_key_value_heads=4,
                 num_hidden_layers=2, intermediate_size=1024, max_position_embeddings=256),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Quantization:
    """How the base model's linear layers are stored while an adapter trains on them, through bitsandbytes.

    4 bits is QLoRA (Dettmers et al. 2023, arXiv 2305.14314): each block of 64 weights is stored as 4-bit codes
    of a data type (NF4, the NormalFloat quantiles of a normal distribution, or FP4) and one scale; with
    `double_quant` the scales are themselves quantized. 8 bits is LLM.int8() (arXiv 2208.07339). Either way each
    matmul dequantizes its weight to `compute_dtype` (`--dtype`) first. transformers leaves the LM head,
    embeddings and norms unquantized, in `--dtype`; with `embeddings` (`--quantize-embeddings`, 4 bits only) the
    input embeddings and LM head are 4-bit tables of the same data type too (`quantized_tables`).
    """

    bits: int                 # 4 or 8
    quant_type: str = "nf4"   # 4 bits: nf4 or fp4
    double_quant: bool = False
    compute_dtype: str = "float32"
    embeddings: bool = False  # the input embeddings and LM head in 4 bits as well

    @classmethod
    def from_config(cls, cfg: Any) -> Quantization | None:
        """From `Config`'s --load-in-4bit / --load-in-8bit flags; None when the base is not quantized."""
        if cfg.load_in_4bit:
            return cls(4, cfg.bnb_4bit_quant_type, cfg.bnb_4bit_double_quant, cfg.dtype, cfg.quantize_embeddings)
        return cls(8, compute_dtype=cfg.dtype) if cfg.load_in_8bit else None

    @property
    def flag(self) -> str:
        return f"--load-in-{self.bits}bit"

    def describe(self) -> str:
        """E.g. "4-bit NF4, double quantization, compute float32 (bitsandbytes)"."""
        kind = (f"4-bit {self.quant_type.upper()}{', double quantization' if self.double_quant else ''}"
                if self.bits == 4 else "8-bit LLM.int8()")
        tables = ", embeddings and LM head in 4 bits too" if self.embeddings else ""
        return f"{kind}{tables}, compute {self.compute_dtype} (bitsandbytes)"

    def bnb_config(self) -> Any:
        """transformers' `BitsAndBytesConfig`; a missing bitsandbytes is one line naming the extra."""
        import_extra("bitsandbytes", "quantization", self.flag)
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            # LLM.int8() computes in float16 by design; bitsandbytes logs that at every matmul of a float32 input.
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[self.compute_dtype])


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` (or the base under a PEFT wrap) holds bitsandbytes-quantized weights."""
    return any(type(module).__module__.startswith("bitsandbytes") for module in model.modules())


def is_preset(name: str) -> bool:
    return name in PRESETS


def build_preset(name: str, seed: int, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A random-init Llama from a preset, initialised from `seed` so runs repeat exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**PRESETS[name])
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_model(name_or_path: str, *, dtype: str = "float32", seed: int = 0,
               attn_implementation: str = "sdpa", empty: bool = False, lean: bool = True,
               quantization: Quantization | None = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a causal LM: a preset name, a local folder or a hub name (`AutoModelForCausalLM.from_pretrained`; a
    vision-language model, one whose config has a `vision_config`, with `AutoModelForImageTextToText`).

    `empty`: the same architecture on the meta device, no weights read or allocated (FSDP2 ranks other than 0,
    which receive their shards from rank 0 once the model is sharded: `distributed.fill_from_rank0`).
    `lean`: Llama-family norm, rotary and SwiGLU layers with fewer passes over memory (`lean_layers`).
    `quantization`: the linear layers quantized as they are read, straight onto `device` (see `Quantization`).
    `attn_implementation` "auto": the kernel `accelerator.choose_attention` picks for the GPU if there is one.
    """
    if attn_implementation == "auto":
        attn_implementation = choose_attention("cuda" if torch.cuda.is_available() else "cpu")
    if quantization is not None:
        model = _load_quantized(name_or_path, dtype=dtype, seed=seed, attn_implementation=attn_implementation,
                                quantization=quantization, device=device)
    elif is_preset(name_or_path):
        with torch.device("meta") if empty else contextlib.nullcontext():
            model = build_preset(name_or_path, seed, attn_implementation)
    else:
        from transformers import AutoConfig

        from safetensors import SafetensorError

        quiet_progress_bars_without_terminal()

        source = _check_model_path(name_or_path)
        try:
            config = AutoConfig.from_pretrained(name_or_path, **source)
            auto = _auto_class(config)
            if empty:
                with torch.device("meta"):
                    model = auto.from_config(config, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
            else:
                model = auto.from_pretrained(
                    name_or_path, dtype=DTYPES[dtype], attn_implementation=attn_implementation, **source)
        except (OSError, ValueError, KeyError) as err:
            raise DPOError(f"{name_or_path}: could not load a causal LM ({_first_line(err)})") from None
        except SafetensorError as err:  # a weights file cut short (a copy or download that did not finish)
            raise DPOError(f"{name_or_path}: a weights file is damaged or truncated ({_first_line(err)}); copy or "
                           "download the model again") from None
    if quantization is None:  # a quantized model's unquantized weights are already in `dtype`
        model.to(DTYPES[dtype])
    disable_dropout(model)
    if lean:
        lean_layers.apply(model)
    return model


def _auto_class(config: Any) -> Any:
    """The transformers auto class for `config`: image-text-to-text for a vision-language model, else causal LM."""
    import transformers

    if getattr(config, "vision_config", None) is not None:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def _load_quantized(name_or_path: str, *, dtype: str, seed: int, attn_implementation: str,
                    quantization: Quantization, device: torch.device | str) -> torch.nn.Module:
    """`from_pretrained` with a `BitsAndBytesConfig`: each linear layer is quantized as it is read. A preset is
    written to a temporary folder first, so that it goes through the same quantizer as any saved model."""
    from transformers import AutoModelForCausalLM

    bnb_config = quantization.bnb_config()
    quiet_progress_bars_without_terminal()
    with tempfile.TemporaryDirectory(prefix="dpokit-preset-") as folder:
        if is_preset(name_or_path):
            _write_preset(build_preset(name_or_path, seed, attn_implementation), Path(folder))
            path, source = folder, {}
        else:
            path, source = name_or_path, _check_model_path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype], attn_implementation=attn_implementation, quantization_config=bnb_config,
                device_map={"": torch.device(device)}, **source)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise DPOError(f"{name_or_path}: could not load a causal LM with {quantization.flag} "
                           f"({_first_line(err)})") from None
    if quantization.embeddings:
        quantized_tables.quantize_embeddings(model, quantization.quant_type, name_or_path)
    host_memory.release_free_memory()  # the quantizer's freed full-precision temporaries
    _own_float_weights(model)
    return model


def _write_preset(model: torch.nn.Module, folder: Path) -> None:
    """`model`'s config and weights as `save_pretrained` lays them out, written by every process: under torchrun,
    transformers' `save_pretrained` writes on rank 0 only, and each rank quantizes from a folder of its own."""
    from safetensors.torch import save_model

    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _own_float_weights(model: torch.nn.Module) -> None:
    """Copy a quantized model's unquantized weights (embeddings, norms, LM head) out of the checkpoint file.

    `from_pretrained` leaves them as views on the memory-mapped safetensors file, and while that mapping lives,
    every page of it read while quantizing stays resident too: the full-precision linears, dead once quantized
    (216 MiB of 404 on benchmarks/memory.py's model, more than its 4-bit layers and adapter together). Owning
    their memory lets the mapping, and those pages, go. Quantized weights are integer tensors, already owned.
    """
    for param in model.parameters():
        if param.dtype.is_floating_point and param.device.type == "cpu":
            param.data = param.data.clone()


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer (`AutoTokenizer`), with a pad token (EOS when it has none); a preset's is
    `preset_tokenizer`. A folder needs only the tokenizer files (`dpo data inspect --model TOKENIZER_DIR`). A
    vision-language model's is its processor (`AutoProcessor`: image processor and tokenizer), whose tokenizer
    gets the pad token."""
    from transformers import AutoProcessor, AutoTokenizer

    if is_preset(name_or_path):
        return preset_tokenizer(name_or_path)
    source = _check_model_path(name_or_path, TOKENIZER_FILES)
    try:
        if _is_vision_language(name_or_path, source):
            processor = AutoProcessor.from_pretrained(name_or_path, **source)
            tokenizer = processor.tokenizer
        else:
            processor = tokenizer = AutoTokenizer.from_pretrained(name_or_path, **source)
    except (OSError, ValueError, KeyError) as err:
        raise DPOError(f"{name_or_path}: could not load a tokenizer ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def _is_vision_language(name_or_path: str, source: dict[str, Any]) -> bool:
    """Whether `name_or_path` holds a vision-language model's config (a tokenizer-only folder has no config)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, **source)
    except (OSError, ValueError, KeyError):
        return False
    return getattr(config, "vision_config", None) is not None


def preset_tokenizer(name: str) -> Any:
    """The tokenizer of a preset model: the synthetic task's vocabulary (`data.synthetic.build_tokenizer`) as a
    `PreTrainedTokenizerFast`, BOS `<s>`, EOS `</s>`, pad = EOS (as the task pads), no chat template.

    Saved with the model (`save_pretrained`), it makes the preset's output folder load with `AutoTokenizer` and
    sample with `dpo generate`; its ids are the task's, so training does not change.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=synthetic.build_tokenizer(), bos_token=synthetic.BOS_TEXT,
                                   eos_token=synthetic.EOS_TEXT, pad_token=synthetic.EOS_TEXT)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode, no-grad deep copy: the DPO reference model."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float, target_modules: str,
               pattern: str | None = None, lean: bool = True) -> torch.nn.Module:
    """Wrap `model` in a PEFT `PeftModel` with a fresh LoRA adapter (Hu et al. 2021); the base is frozen.

    `target_modules` is PEFT's "all-linear" (every linear layer of attention and MLP, not the LM head) or
    comma-separated module names (`q_proj,v_proj`); `pattern`, a PEFT regex over full module names, replaces
    them (a vision-language model's language layers only: `vision.language_lora_targets`). The adapter starts
    as a no-op (B = 0), so the wrapped model scores exactly like the base at step 0. `lean`: the adapter's
    product added in place (`lean_layers.apply_lora`).
    """
    peft = import_extra("peft", "lora", "--lora-r")
    targets: str | list[str] = (pattern or target_modules if pattern or target_modules == "all-linear"
                                else [name.strip() for name in target_modules.split(",") if name.strip()])
    config = peft.LoraConfig(r=r, lora_alpha=alpha,  # type: ignore[arg-type]  # annotated int; scaling = alpha / r
                        lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        with _peft_wraps_quietly():
            wrapped = peft.get_peft_model(model, config)
    except ValueError as err:
        raise DPOError(f"--lora-target-modules {target_modules}: {_first_line(err)}") from None
    if lean:
        lean_layers.apply_lora(wrapped)
    return wrapped


def load_lora_adapter(model: torch.nn.Module, path: str, *, r: int = 0, lean: bool = True) -> torch.nn.Module:
    """Wrap `model` with an existing PEFT LoRA adapter folder, trainable, to go on training it (`lean`: as in
    `apply_lora`).

    The adapter's own config (rank, alpha, targets) wins; a `--lora-r` that disagrees with it is refused.
    """
    peft = import_extra("peft", "lora", "--lora-adapter")
    if not (Path(path) / "adapter_config.json").is_file():
        raise DPOError(f"--lora-adapter {path}: no PEFT adapter here (no adapter_config.json)")
    try:
        config = peft.PeftConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise DPOError(f"--lora-adapter {path}: could not read the adapter config ({_first_line(err)})") from None
    if r and getattr(config, "r", r) != r:
        raise DPOError(f"--lora-r {r} disagrees with the adapter in {path} (r={config.r}); drop --lora-r")
    try:
        with _peft_wraps_quietly():
            wrapped = peft.PeftModel.from_pretrained(model, path, is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise DPOError(f"--lora-adapter {path}: could not load the adapter ({_first_line(err)})") from None
    if lean:
        lean_layers.apply_lora(wrapped)
    return wrapped


@contextlib.contextmanager
def _peft_wraps_quietly() -> Iterator[None]:
    """PEFT's `PeftModel` reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
    FutureWarning on every LoRA run; that one warning is PEFT's to fix, not the user's, so it is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a PEFT wrap (checked without importing peft when it is not loaded)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def quiet_progress_bars_without_terminal() -> None:
    """transformers' "Loading weights" / "Writing model shards" bars are noise in log files and CI."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def save_policy(policy: torch.nn.Module, output: Path, *, merge_lora: bool = False, base_model: str | None = None,
                state_dict: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the trained policy to `output/model` and return that folder.

    - full fine-tuning: the model (`save_pretrained`, safetensors);
    - LoRA: the adapter in PEFT format, loadable with `PeftModel.from_pretrained(base, dir)` or
      `AutoPeftModelForCausalLM.from_pretrained(dir)` (its config names `base_model`, made absolute when local);
    - LoRA with `merge_lora`: the adapter merged into the base, a plain model that
      `AutoModelForCausalLM.from_pretrained` loads alone; the adapter itself goes to `output/adapter`.
      Merging happens in place (the policy is no longer a PEFT wrap afterwards), so call this last.
      A quantized base (QLoRA) is first dequantized to its compute dtype, so the merged model is a full-precision
      model that scores as the trained policy did (merging into 4-bit weights would round the adapter away).

    `state_dict` replaces the policy's own weights when they are sharded (FSDP2: the gathered full state).
    `dtype`: write a full model's floating-point weights in this dtype (FSDP2 trains float32 master weights under
    `--dtype bfloat16`; the saved model is then bf16, as a one-device bf16 run saves it).

    A failed write (disk full, no permission) removes the half-written folder and raises one `TrainingFailure`
    saying what to do: the checkpoints are untouched, so with them the same command plus --resume saves again.
    """
    quiet_progress_bars_without_terminal()
    try:
        return _write_policy(policy, output, merge_lora=merge_lora, base_model=base_model, state_dict=state_dict,
                             dtype=dtype)
    except OSError as err:
        for folder in (output / "model", output / "adapter"):
            shutil.rmtree(folder, ignore_errors=True)
        raise _save_failure(output, err) from None


def _save_failure(output: Path, err: OSError) -> TrainingFailure:
    checkpoints = output / "checkpoints"
    newest = max((p for p in checkpoints.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]),
                 default=None)
    then = (f"the checkpoints are intact (newest {newest}): free disk space, then run the same command with "
            "--resume to save the model from it" if newest is not None else
            "no checkpoint was saved (--save-every): free disk space and train again")
    return TrainingFailure(f"could not save the trained model to {output / 'model'}: {err.strerror or err} "
                           f"(the half-written folder was removed); {then}")


def _write_policy(policy: torch.nn.Module, output: Path, *, merge_lora: bool, base_model: str | None,
                  state_dict: dict[str, torch.Tensor] | None, dtype: torch.dtype | None) -> Path:
    """`save_policy`'s writing, which may fail half-way."""
    model_dir = output / "model"
    if not is_lora(policy):
        if dtype is not None:
            weights = state_dict if state_dict is not None else policy.state_dict()
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        policy.save_pretrained(model_dir, safe_serialization=True, state_dict=state_dict)
        if dtype is not None:  # save_pretrained writes the in-memory weights' dtype into config.json
            config_file = model_dir / "config.json"
            config = json.loads(config_file.read_text())
            config["dtype"] = str(dtype).removeprefix("torch.")
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return model_dir
    if base_model is not None:
        local = Path(base_model)
        policy.peft_config["default"].base_model_name_or_path = (
            str(local.resolve()) if (local / "config.json").is_file() else base_model)
    # The adapter never trains the embeddings (LoRA targets linears): PEFT need not look the base model up on the
    # hub to decide whether to save them (it warns twice when offline or for a preset).
    if not merge_lora:
        policy.save_pretrained(model_dir, safe_serialization=True, state_dict=state_dict, save_embedding_layers=False)
        return model_dir
    policy.save_pretrained(output / "adapter", safe_serialization=True, save_embedding_layers=False)
    if is_quantized(policy):
        merged = _merge_dequantized(policy, output / "adapter")
        print(f"--merge-lora: merged the adapter into a dequantized {str(merged.dtype).removeprefix('torch.')} copy of the quantized base; "
              f"the adapter alone is in {output / 'adapter'}", flush=True)
    else:
        merged = policy.merge_and_unload()
    merged.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def _merge_dequantized(policy: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """The base without its adapter, dequantized in place (transformers' `dequantize`: each quantized linear
    becomes an `nn.Linear` holding the weights the training forward used; so do 4-bit embeddings and head), with
    the saved adapter merged in."""
    import peft

    base = policy.unload()
    base.dequantize()
    quantized_tables.dequantize_embeddings(base)
    with _peft_wraps_quietly():
        return peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO compares log-probs of two models; dropout would make them noisy. TRL does the same."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


MODEL_FILES = ("config.json", "adapter_config.json")
HUB_PROBE_TIMEOUT_S = 10


def _check_model_path(name_or_path: str, files: tuple[str, ...] = MODEL_FILES) -> dict[str, Any]:
    """Fail at once, saying what to do, when `name_or_path` cannot be loaded; else the extra `from_pretrained`
    arguments it needs.

    A folder must hold one of `files`. A name that does not exist and cannot be a hub repo id (`./x`, `a/b/c`)
    is a missing folder. A hub name not in the local hub cache is looked up on the hub once: huggingface_hub
    retries an unreachable host for about 50 s, which turns a typo into a long wait that blames the network.
    A cached hub name whose hub cannot be reached loads from the cache. With HF_HUB_OFFLINE only the cache is used.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name_or_path)
    if path.exists():
        if not any((path / name).is_file() for name in files):
            raise DPOError(f"{name_or_path}: no model here (no {' or '.join(files)}); give a folder written by "
                           f"save_pretrained, a hub name, or a preset ({', '.join(PRESETS)})")
        return {}
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise DPOError(f"{name_or_path}: no such folder; give a folder written by save_pretrained, a hub name "
                       f"(org/name), or a preset ({', '.join(PRESETS)})") from None
    cached = any(isinstance(try_to_load_from_cache(name_or_path, name), str) for name in files)
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise DPOError(f"{name_or_path}: no such folder, and not in the hub cache ({constants.HF_HUB_CACHE}) "
                           "while HF_HUB_OFFLINE is set; point --model at a local folder written by save_pretrained, "
                           "or unset HF_HUB_OFFLINE to download it")
        return {}
    from huggingface_hub.utils import build_hf_headers, get_session

    url = f"{constants.ENDPOINT}/api/models/{name_or_path}"
    try:
        status = get_session().head(url, headers=build_hf_headers(), timeout=HUB_PROBE_TIMEOUT_S).status_code
    except Exception as err:  # the HTTP client raises many types (refused, DNS, proxy, TLS, timeout)
        if cached:
            return {"local_files_only": True}
        raise DPOError(f"{name_or_path}: no such folder, and the hub ({constants.ENDPOINT}) cannot be reached "
                       f"({_first_line(err)}); point --model at a local folder written by save_pretrained, or set "
                       "HF_HUB_OFFLINE=1 to use the hub cache only") from None
    if status in (401, 404) and not cached:
        raise DPOError(f"{name_or_path}: no such folder, and no model of that name on the hub ({constants.ENDPOINT}); "
                       "check the spelling (or log in with `hf auth login` for a private model)")
    return {}


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
