"""Preference losses as pure functions of log-prob tensors, and the registry that names them.

`registry` holds the contract (`LossOutput`, `LossSpec`, `register`, `get`, `names`; see its docstring for how
to register your own loss); the other modules register the built-in losses when this package is imported:
`paired` (DPO and the losses on the chosen-rejected difference), `anchored` (losses on each side's log-ratio),
`reference_free` (SimPO, ORPO, CPO, SFT), `triple` (TPO: a pair plus a gold response) and `unpaired` (KTO).
"""

from . import anchored, paired, reference_free, triple, unpaired  # noqa: F401  (registration)
from .registry import LossFunction, LossOutput, LossSpec, get, names, register

__all__ = ["LossFunction", "LossOutput", "LossSpec", "get", "names", "register"]
