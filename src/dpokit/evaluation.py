"""`dpo eval`: is the trained policy better than its reference, and at what KL cost?

Two kinds of evidence, from two kinds of input:

- Preference pairs (held out): DPO's implicit reward r(x, y) = beta * log pi(y|x) / pi_ref(y|x) (Rafailov et al.
  2023, Eq. 5) of chosen vs rejected: `rewards/accuracies` (share of pairs with r_chosen > r_rejected) and
  `rewards/margins`, under TRL's names.
- Prompts and a reward function: completions sampled from the policy and from the reference, scored by the
  user's reward: mean reward, win rate of the policy's sample over the reference's sample for the same prompt
  and sample number (ties count half), and the sequence-level KL(pi || pi_ref), estimated as the mean over
  policy samples y ~ pi(.|x) of log pi(y|x) - log pi_ref(y|x). That estimate is unbiased only for samples drawn
  at temperature 1 without top-p; it is the x-axis of the DPO paper's reward-KL frontier (Sec. 6.1, Fig. 2).

Prompts may carry images (a vision-language model's `--prompts` records with `images` / `image`, as `dpo
generate` takes them): both models sample and score each completion with its prompt's images, and a reward
function that takes an `images` keyword gets each completion's prompt images (their sources: absolute paths or
encoded bytes), as TRL passes dataset columns to reward functions.

Policy and reference samples use the same seeds (common random numbers): when the two models are the same,
their samples are identical, the win rate is exactly 0.5 and the KL estimate exactly 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import distributed, generate, models
from .data import preparation as pipeline
from .errors import DPOError
from .batching import layout_for
from .logprobs import PairLogps
from .reference import ModelReference, precompute_reference
from .data.formats import Text
from .data.tokenization import TokenizedPair

# (prompts as given: strings or message lists, completions) -> one reward each
RewardFunction = Callable[[list[Text], list[str]], Sequence[float]]


def dataset_logps(model: torch.nn.Module, pairs: Sequence[TokenizedPair], *, batch_size: int = 32) -> PairLogps:
    """Summed completion log-probs of every pair under `model` (`[pairs]` each, on the CPU): the same batched,
    no-grad pass that `--precompute-ref` makes over a dataset, with `model` frozen as a reference."""
    device = next(model.parameters()).device
    layout = layout_for(attn_implementation=getattr(model.config, "_attn_implementation", None) or "eager")
    table = precompute_reference(ModelReference(model), pairs, layout=layout, pad_id=0, batch_size=batch_size,
                                 device=device).table
    return PairLogps(table["chosen"], table["rejected"], table["chosen_lengths"], table["rejected_lengths"])


def completion_logps(model: torch.nn.Module, samples: Sequence[generate.Sample], *, batch_size: int = 32,
                     ) -> torch.Tensor:
    """log pi(y|x) of each sampled completion `[samples]`: scored as a pair whose two sides are the completion."""
    pairs = [TokenizedPair(s.prompt_ids, s.completion_ids, s.completion_ids, image_inputs=s.image_inputs)
             for s in samples]
    return dataset_logps(model, pairs, batch_size=batch_size).chosen


def preference_metrics(policy: torch.nn.Module, reference: torch.nn.Module, pairs: Sequence[TokenizedPair], *,
                       beta: float, batch_size: int = 32) -> dict[str, float]:
    """Reward accuracy and margins of `policy` against `reference` on preference pairs (TRL's metric names)."""
    if not pairs:
        raise DPOError("eval: no preference pairs to evaluate")
    policy_logps = dataset_logps(policy, pairs, batch_size=batch_size)
    reference_logps = dataset_logps(reference, pairs, batch_size=batch_size)
    chosen_rewards = beta * (policy_logps.chosen - reference_logps.chosen)           # [pairs], Eq. 5
    rejected_rewards = beta * (policy_logps.rejected - reference_logps.rejected)     # [pairs]
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": policy_logps.chosen.mean().item(), "logps/rejected": policy_logps.rejected.mean().item(),
            "pairs": float(len(pairs))}


def score_samples(reward: RewardFunction, prompts: Sequence[Text], texts: Sequence[tuple[generate.Sample, str]],
                  images: Sequence[Sequence[Any]] | None = None) -> torch.Tensor:
    """The user's reward of each sample `[samples]`, checked: one finite number per sample. With `images` (each
    prompt's), a reward function that takes an `images` keyword gets each sample's prompt images."""
    extra = ({"images": [list(images[s.prompt_index]) for s, _ in texts]}
             if images is not None and any(images) and _takes_images(reward) else {})
    values = reward([prompts[s.prompt_index] for s, _ in texts], [text for _, text in texts], **extra)
    try:
        scores = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        raise DPOError("--reward: the reward function must return one number per completion") from None
    if scores.numel() != len(texts):
        raise DPOError(f"--reward: the reward function returned {scores.numel()} values for {len(texts)} completions")
    if not torch.isfinite(scores).all():
        raise DPOError("--reward: the reward function returned a non-finite value")
    return scores


def sample_metrics(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, prompts: Sequence[Text],
                   reward: RewardFunction, *, batch_size: int = 32, images: Sequence[Sequence[Any]] | None = None,
                   **sampling: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean reward, win rate and KL(policy || reference) from samples; also one record per policy sample.

    `images`: each prompt's image sources (`generate.read_image_prompts`), for a vision-language model.
    `sampling`: `sample`'s options (num_samples, max_new_tokens, temperature, top_p, seed).
    """
    policy_texts = generate.sample_texts(policy, tokenizer, prompts, images, batch_size=batch_size, **sampling)
    reference_texts = generate.sample_texts(reference, tokenizer, prompts, images, batch_size=batch_size, **sampling)
    policy_rewards = score_samples(reward, prompts, policy_texts, images)            # [samples]
    reference_rewards = score_samples(reward, prompts, reference_texts, images)     # [samples], same (x, k) order
    samples = [s for s, _ in policy_texts]
    log_ratios = (completion_logps(policy, samples, batch_size=batch_size).double()
                  - completion_logps(reference, samples, batch_size=batch_size).double())   # [samples]
    wins = (policy_rewards > reference_rewards).double() + 0.5 * (policy_rewards == reference_rewards).double()
    n = len(samples)
    metrics = {
        "reward": policy_rewards.mean().item(), "reward_stderr": _stderr(policy_rewards),
        "reference_reward": reference_rewards.mean().item(), "reference_reward_stderr": _stderr(reference_rewards),
        "win_rate": wins.mean().item(),
        "kl": log_ratios.mean().item(), "kl_stderr": _stderr(log_ratios),
        "completion_tokens": sum(len(s.completion_ids) for s in samples) / n,
        "samples": float(n),
    }
    records = [{"prompt": prompts[s.prompt_index], "completion": text, "prompt_index": s.prompt_index,
                "sample_index": s.sample_index, "reward": float(r), "reference_reward": float(rr),
                "log_ratio": float(lr)}
               for (s, text), r, rr, lr in zip(policy_texts, policy_rewards, reference_rewards, log_ratios)]
    return metrics, records


def _takes_images(reward: RewardFunction) -> bool:
    try:
        parameters = inspect.signature(reward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(p.name == "images" or p.kind is p.VAR_KEYWORD for p in parameters)


def _stderr(values: torch.Tensor) -> float:
    return values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else float("nan")


def load_reward(spec: str) -> RewardFunction:
    """`module:function` or `path/to/file.py:function` -> the function (called with prompts and completions)."""
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name:
        raise DPOError(f"--reward: expected module:function or file.py:function, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DPOError(f"--reward: {path}: file not found")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)                   # type: ignore[arg-type]
            module_spec.loader.exec_module(module)                                  # type: ignore[union-attr]
        else:
            if "" not in sys.path:  # `dpo` as an installed script does not see the working directory
                sys.path.insert(0, "")
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise DPOError(f"--reward: cannot import {module_name!r} ({err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DPOError(f"--reward: {module_name!r} has no function {function_name!r}")
    return function  # type: ignore[no-any-return]


def run_settings(run: str) -> dict[str, Any]:
    """What `dpo eval --run OUTPUT` takes from a `dpo train` output folder, as `evaluate_models` keywords: the
    trained `model/`, its reference (the run's --ref-model, else the model it started from, a preset built with
    the run's seed), its tokenizer, beta and length limits, and the run's config for its held-out pairs."""
    from .config import Config

    folder = Path(run)
    if not (folder / "config.yaml").is_file():
        raise DPOError(f"--run {run}: no config.yaml here; give a folder that `dpo train --output` wrote")
    if not (folder / "model").is_dir():
        raise DPOError(f"--run {run}: no model/ folder (the run has not finished); give --model PATH as well, "
                       "e.g. a checkpoint folder")
    cfg = Config.from_yaml(folder / "config.yaml")
    return dict(model=str(folder / "model"), ref_model=cfg.ref_model or cfg.model, ref_seed=cfg.seed,
                tokenizer=cfg.tokenizer or cfg.model, beta=cfg.beta, max_length=cfg.max_length,
                max_prompt_length=cfg.max_prompt_length, run_config=cfg)


def _held_out(cfg: Any, tokenizer: Any) -> list[TokenizedPair]:
    """The run's own held-out pairs: its data prepared again with its split settings (the same seed, the same
    pairs; a cache hit when the run cached them)."""
    prepared = pipeline.prepare(pipeline.DataSettings.from_settings(cfg.to_dict()), tokenizer, cache=cfg.cache,
                                cache_dir=cfg.cache_dir)
    if not prepared.eval:
        raise DPOError(f"--run: the run held out no pairs (--eval-fraction {cfg.eval_fraction}, no --eval-data); "
                       "give --data or --prompts")
    return prepared.eval


def evaluate_models(*, model: str, ref_model: str, data: str | None = None, prompts: str | None = None,
                    reward: str | None = None, out: str | None = None, samples_out: str | None = None,
                    beta: float = 0.1, max_length: int = 1024, max_prompt_length: int | None = 512,
                    device: str = "auto", dtype: str = "float32", batch_size: int = 32, ref_seed: int = 0,
                    tokenizer: str | None = None, run_config: Any = None, **sampling: Any) -> dict[str, float]:
    """`dpo eval`: preference metrics on `data` (or, with `run_config` from `run_settings` and neither `data` nor
    `prompts`, on the run's held-out pairs) and/or sample metrics on `prompts` under `reward`; prints them,
    writes them as JSON to `out` and the policy's scored samples to `samples_out` (JSONL) when given.
    `tokenizer`: where to load it from (default: `model`); `ref_seed`: the seed a preset reference is built with."""
    if data is None and prompts is None and run_config is None:
        raise DPOError("eval: give --data (preference pairs) and/or --prompts with --reward, or --run OUTPUT")
    if prompts is not None and reward is None:
        raise DPOError("eval: --prompts needs --reward module:function to score the samples")
    reward_fn = load_reward(reward) if prompts is not None and reward is not None else None
    where = distributed.resolve_device(device)
    loaded_tokenizer = models.load_tokenizer(tokenizer or model)
    policy = models.load_model(model, dtype=dtype).to(where)
    reference = models.load_model(ref_model, dtype=dtype, seed=ref_seed).to(where)
    metrics: dict[str, float] = {}
    held_out = None
    if data is not None:
        settings = pipeline.DataSettings(data, max_length=max_length, max_prompt_length=max_prompt_length)
        held_out = pipeline.prepare(settings, loaded_tokenizer).train
    elif prompts is None:
        held_out = _held_out(run_config, loaded_tokenizer)
    if held_out is not None:
        metrics |= {f"eval/{k}": v for k, v in
                    preference_metrics(policy, reference, held_out, beta=beta, batch_size=batch_size).items()}
    if prompts is not None and reward_fn is not None:
        if sampling.get("temperature", 1.0) != 1.0 or sampling.get("top_p", 1.0) != 1.0:
            print("note: the KL estimate is unbiased only for --temperature 1 --top-p 1", file=sys.stderr)
        texts, images = generate.read_image_prompts(prompts)
        found, records = sample_metrics(policy, reference, loaded_tokenizer, texts, reward_fn, batch_size=batch_size,
                                        images=images, **sampling)
        metrics |= {f"samples/{k}": v for k, v in found.items()}
        if samples_out:
            Path(samples_out).parent.mkdir(parents=True, exist_ok=True)
            Path(samples_out).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for name, value in metrics.items():
        print(f"{name:<32}{value:>12.4f}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
