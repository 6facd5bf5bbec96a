"""dpokit: Direct Preference Optimization and its family of losses for Hugging Face causal LMs.

The Python API is the `dpo train` command as functions (see examples/api_example.py):

    from dpokit import Config, train

    summary = train(Config(model="path/to/sft-model", data="pairs.jsonl", beta=0.1, output="runs/beta0.1"))
    print(summary.eval_after["rewards/accuracies"], summary.model_dir)

`online(cfg, OnlineOptions(rewards=["task.py:score"]))` runs iterative DPO (`dpo online`) with the same `Config`.
`Config` also comes from YAML (`Config.from_yaml`) or `dpo train` flags (`Config.from_args`), with the same
validation; `register_loss` adds a loss usable as `loss="name"`; `load_pairs` reads and normalises a data file.
Only `Config` is imported eagerly (it needs no torch), so `import dpokit` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import DPOError, TrainingFailure

if TYPE_CHECKING:
    from .data.formats import PreferencePair, load_pairs
    from .loop import Summary, train
    from .online import OnlineOptions, OnlineSummary, online
    from .losses import LossOutput
    from .losses import register as register_loss

__version__ = "0.1.0"
__all__ = ["Config", "DPOError", "LossOutput", "OnlineOptions", "OnlineSummary", "PreferencePair", "Summary",
           "TrainingFailure", "load_pairs", "online", "register_loss", "train"]

# name -> (module, attribute): imported on first use, since they pull in torch and transformers
_LAZY = {"train": ("loop", "train"), "Summary": ("loop", "Summary"), "register_loss": ("losses", "register"),
         "LossOutput": ("losses", "LossOutput"), "load_pairs": ("data.formats", "load_pairs"),
         "PreferencePair": ("data.formats", "PreferencePair"), "online": ("online", "online"),
         "OnlineOptions": ("online", "OnlineOptions"), "OnlineSummary": ("online", "OnlineSummary")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dpokit' has no attribute {name!r}")
    import importlib

    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # later look-ups skip __getattr__
    return value
