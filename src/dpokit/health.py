"""Training-health alarms: `dpo train` watches its own metric rows and says when a run is going wrong.

Most failed DPO runs do not crash: the loss sits at log 2, the chosen log-probs fall while the margin grows, the
rewards turn NaN. `HealthMonitor.check(row)` reads each logged training row (the TRL-named metrics of `metrics.py`)
and returns the `Alarm`s it raises, each at most once per run:

- `no_learning`: loss within 1e-3 of log 2 and reward accuracy no better than chance for `Limits.window` rows in
  a row; the message says which causes the rows rule in or out (policy scoring exactly as the reference, a zero
  gradient, a learning rate too small to move the weights).
- `reference_mismatch`: at step 1 the policy is the starting model, so when the reference is that model too
  their log-probs of the data agree; when they do not, the reference is another model (precomputed log-probs
  from another model or tokenization, a stale cache).
- `likelihood_displacement`: the chosen completions' log-probs (averaged over `Limits.window` rows) fall more than
  `Limits.displacement` nats per token below their start while the reward margin grows (OpenRLHF#1054); `--rpo-alpha` or `--loss dpop` hold
  the chosen likelihood up.
- `length_hacking`: the length gap (preferred minus other completion, tokens) of the pairs the policy now prefers
  drifts from the data's chosen-minus-rejected gap by more than `Limits.length_drift` of the data's mean |gap|;
  needs the `LENGTH_GAP` metric in the rows (see `preferred_length_gap`).
- `kl_explosion`: the mean |policy - reference log-ratio| on the data (rewards / beta) exceeds `Limits.kl` nats
  per completion token.
- `grad_norm_spike`: a gradient norm `Limits.grad_spike` times the median of the norms logged before it.
- `non_finite`: a NaN or inf in a row, or steps skipped for a non-finite loss or gradient; the message names the
  first culprit in the order the step computes them (policy log-probs, rewards, loss, gradient).

Each alarm becomes a log line (`Alarm.line`), a `health/<name>` key of its metrics row (`row_keys`) and a line of
summary.md (`summary_section`). `--no-health-checks` swaps in `NullMonitor`, which raises nothing.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import losses
from .config import Config
from .data.tokenization import TokenizedPair

LOG2 = math.log(2.0)
# The row metric the length check reads: mean over the logged pairs of sign(chosen reward - rejected reward) x
# (chosen tokens - rejected tokens); the loop logs it only when the metric meter adds it (`preferred_length_gap`).
LENGTH_GAP = "lengths/preferred_gap"
# The order in which one training step computes what a row reports: the first non-finite one is the culprit.
COMPUTED_ORDER = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                  "loss", "grad_norm")
WHERE = {"logps/chosen": "the policy's forward pass", "logps/rejected": "the policy's forward pass",
         "rewards/chosen": "the reference's log-probs or the rewards", "rewards/rejected":
         "the reference's log-probs or the rewards", "rewards/margins": "the rewards", "loss": "the loss",
         "grad_norm": "the backward pass"}


@dataclass(frozen=True)
class Limits:
    """When each alarm fires. The defaults are meant to stay silent on healthy runs (see the README)."""

    window: int = 10                # rows: no learning for this many in a row; displacement and the length gap are
                                    # averaged over the last this many (one batch's numbers are noisy)
    loss_tolerance: float = 1e-3    # |loss - log 2| that counts as "at log 2"
    chance_slack: float = 0.05      # accuracy up to 0.5 + this counts as chance
    mismatch: float = 0.05          # nats per token between policy and reference at step 1
    displacement: float = 0.1       # nats per chosen token of fall in the chosen log-probs
    length_drift: float = 0.5       # share of the data's mean |length gap|
    kl: float = 1.0                 # nats per completion token of mean |log-ratio|
    grad_spike: float = 10.0        # times the median gradient norm so far
    grad_history: int = 5           # rows of gradient norms needed before a spike can be called


@dataclass(frozen=True)
class DataStats:
    """What the alarms compare the run with: the training pairs' completion lengths (tokens)."""

    chosen_length: float   # mean tokens of a chosen completion
    rejected_length: float
    length_gap: float      # mean of chosen minus rejected tokens
    abs_length_gap: float  # mean of |chosen - rejected| tokens: the largest gap a policy's preferences can reach

    @classmethod
    def of_pairs(cls, pairs: Sequence[TokenizedPair], sample: int = 10_000) -> DataStats:
        """Statistics of up to `sample` pairs spread evenly over `pairs` (streamed data is not read in full)."""
        stride = max(1, len(pairs) // sample)
        chosen, rejected = [], []
        for i in range(0, len(pairs), stride):
            chosen.append(len(pairs[i].chosen_ids))
            rejected.append(len(pairs[i].rejected_ids))
        n = max(len(chosen), 1)
        return cls(chosen_length=sum(chosen) / n, rejected_length=sum(rejected) / n,
                   length_gap=sum(c - r for c, r in zip(chosen, rejected)) / n,
                   abs_length_gap=sum(abs(c - r) for c, r in zip(chosen, rejected)) / n)

    @property
    def completion_length(self) -> float:
        return max((self.chosen_length + self.rejected_length) / 2, 1.0)


@dataclass(frozen=True)
class Alarm:
    name: str
    step: int
    message: str

    @property
    def key(self) -> str:
        return f"health/{self.name}"

    @property
    def line(self) -> str:
        """The log line: `health: <name> at step N: <message>`."""
        return f"health: {self.name} at step {self.step}: {self.message}"


class Monitor(Protocol):
    alarms: list[Alarm]

    def check(self, row: Mapping[str, Any]) -> list[Alarm]: ...

    def replay(self, rows: Iterable[Mapping[str, Any]]) -> None: ...


@dataclass
class HealthMonitor:
    """Feed it every logged training row with `check`; it returns the alarms that row raises (each name once).

    `beta` is set when the first loss's rewards are beta x log pi/pi_ref (a loss with a reference): the log-ratio
    checks (KL, step-1 mismatch, displacement measured against the reference) need it. `reference_is_start`: the
    reference is the starting policy (no --ref-model, no --lora-adapter), so the two agree at step 1; with
    `reference_moves` (TR-DPO) the log-ratio no longer measures the fall from the start.
    """

    data: DataStats
    beta: float | None = None
    reference_is_start: bool = False
    reference_moves: bool = False
    pretrained: bool = True         # a preset is random-init: no learned distribution to stay near (no KL alarm)
    limits: Limits = field(default_factory=Limits)
    alarms: list[Alarm] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._flat_rows = 0
        self._chosen: deque[float] = deque(maxlen=self.limits.window)
        self._margins: deque[float] = deque(maxlen=self.limits.window)
        self._start: tuple[float, float] | None = None  # the chosen measure and margin the fall is counted from
        self._grad_norms: list[float] = []
        self._length_gaps: deque[float] = deque(maxlen=self.limits.window)

    @classmethod
    def from_config(cls, cfg: Config, pairs: Sequence[TokenizedPair], *, pretrained: bool = True) -> Monitor:
        """The monitor for this run (a `NullMonitor` with --no-health-checks), from its settings and train pairs.
        `pretrained`: the policy starts from learned weights (not a random-init preset)."""
        if not cfg.health_checks:
            return NullMonitor()
        first = losses.get(cfg.loss_names[0])
        log_ratio_rewards = first.needs_reference and first.paired
        return cls(DataStats.of_pairs(pairs), beta=cfg.beta if log_ratio_rewards else None,
                   reference_is_start=log_ratio_rewards and cfg.ref_model is None and cfg.lora_adapter is None,
                   reference_moves=cfg.ref_sync_every is not None or cfg.ref_update == "bema",
                   pretrained=pretrained)

    def replay(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Catch up on a resumed run's earlier rows (read back from metrics.jsonl), keeping the alarms they raised
        (already reported then) so that none is raised twice and summary.md lists them all."""
        for row in rows:
            self.check(row)

    def check(self, row: Mapping[str, Any]) -> list[Alarm]:
        """The alarms `row` raises; rows other than training rows (eval rows have no `loss`) raise none."""
        if not isinstance(row.get("loss"), (int, float)):
            return []
        step = int(row["step"])
        raised = []
        for name, message in self._findings(row):
            if name not in {a.name for a in self.alarms}:
                alarm = Alarm(name, step, message)
                self.alarms.append(alarm)
                raised.append(alarm)
        return raised

    def _findings(self, row: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        non_finite = _non_finite(row)
        if non_finite:
            yield "non_finite", non_finite
            return  # the other checks would read NaN
        checks = (("no_learning", self._no_learning), ("reference_mismatch", self._reference_mismatch),
                  ("likelihood_displacement", self._displacement), ("length_hacking", self._length),
                  ("kl_explosion", self._kl), ("grad_norm_spike", self._grad_spike))
        for name, check in checks:  # every check runs on every row: each keeps its own history
            message = check(row)
            if message:
                yield name, message

    # ---- the checks: each reads one row (and what earlier rows left), returns a message or None ----------------

    def _no_learning(self, row: Mapping[str, Any]) -> str | None:
        flat = abs(row["loss"] - LOG2) <= self.limits.loss_tolerance and \
            row.get("rewards/accuracies", 0.0) <= 0.5 + self.limits.chance_slack
        self._flat_rows = self._flat_rows + 1 if flat else 0
        if self._flat_rows != self.limits.window:
            return None
        checks = []
        if row.get("rewards/chosen") == 0.0 and row.get("rewards/rejected") == 0.0:
            checks.append("the policy scores every pair exactly as the reference does (the weights have not moved, "
                          "or the reference is the policy itself)")
        else:
            checks.append("the policy's scores differ from the reference's, by too little to matter")
        grad_norm, lr = row.get("grad_norm"), row.get("lr")
        if grad_norm == 0.0:
            checks.append("the gradient norm is 0: nothing trainable reaches the loss")
        elif grad_norm is not None:
            checks.append(f"the gradient is not zero (norm {grad_norm:.3g})")
        if lr is not None and grad_norm:
            checks.append(f"lr {lr:.3g} (lr x grad norm {lr * grad_norm:.3g}; below ~1e-7 float32 weights barely "
                          "move: try a larger --lr)")
        return (f"loss within {self.limits.loss_tolerance:g} of log 2 and reward accuracy at chance for "
                f"{self.limits.window} logged rows; checked: {'; '.join(checks)}")

    def _reference_mismatch(self, row: Mapping[str, Any]) -> str | None:
        if not (self.reference_is_start and self.beta and row["step"] == 1 and "rewards/chosen" in row):
            return None
        gap = _mean_abs_log_ratio(row, self.beta) / self.data.completion_length
        if gap <= self.limits.mismatch:
            return None
        return (f"at step 1 the policy is the starting model, yet its log-probs differ from the reference's by "
                f"{gap:.3g} nats per token: the reference is another model (precomputed reference log-probs from "
                "another model or tokenization: rerun with --no-cache)")

    def _displacement(self, row: Mapping[str, Any]) -> str | None:
        if "logps/chosen" not in row or "rewards/margins" not in row:
            return None
        # Against the starting reference the chosen log-ratio is the fall itself, free of which completions the
        # batch drew; otherwise the chosen log-probs are compared with the mean of the first `window` rows.
        against_reference = bool(self.beta and self.reference_is_start and not self.reference_moves)
        self._chosen.append(row["rewards/chosen"] / self.beta if against_reference else row["logps/chosen"])
        self._margins.append(row["rewards/margins"])
        if len(self._chosen) < self.limits.window:
            return None
        chosen, margin = statistics.fmean(self._chosen), statistics.fmean(self._margins)
        if self._start is None:
            self._start = (0.0, 0.0) if against_reference else (chosen, margin)  # policy == reference at step 1
            if not against_reference:
                return None
        fall = self._start[0] - chosen
        per_token = fall / max(self.data.chosen_length, 1.0)
        if per_token <= self.limits.displacement or margin <= max(self._start[1], 0.0):
            return None
        return (f"the chosen completions' log-probs fell {fall:.3g} nats ({per_token:.3g} per token, mean of the "
                f"last {self.limits.window} rows) below their start while the reward margin grew to {margin:.3g}: "
                "the policy is pushing both completions down; add --rpo-alpha 1.0 (an NLL term on chosen) or use "
                "--loss dpop --dpop-lambda 50")

    def _length(self, row: Mapping[str, Any]) -> str | None:
        if LENGTH_GAP not in row or self.data.abs_length_gap == 0:
            return None
        self._length_gaps.append(row[LENGTH_GAP])
        if len(self._length_gaps) < self.limits.window:
            return None
        now = sum(self._length_gaps) / len(self._length_gaps)
        drift = (now - self.data.length_gap) / self.data.abs_length_gap
        # Toward shorter only once the policy prefers the shorter completion outright: at the start (every reward
        # tied) the gap is 0, whatever the data's.
        if drift > self.limits.length_drift or (drift < -self.limits.length_drift and now < 0):
            side = "longer" if drift > 0 else "shorter"
            return (f"the completions the policy prefers are {now:+.3g} tokens longer than the other on average "
                    f"(last {self.limits.window} rows), the data's chosen {self.data.length_gap:+.3g}: it is learning "
                    f"to prefer {side} completions, not better ones (try --loss sigmoid_norm or --ld-alpha 0.5)")
        return None

    def _kl(self, row: Mapping[str, Any]) -> str | None:
        if not self.beta or not self.pretrained or "rewards/chosen" not in row:
            return None
        per_token = _mean_abs_log_ratio(row, self.beta) / self.data.completion_length
        if per_token <= self.limits.kl:
            return None
        return (f"mean |policy - reference log-ratio| is {per_token:.3g} nats per completion token (limit "
                f"{self.limits.kl:g}): the policy is running away from the reference; lower --lr or raise --beta")

    def _grad_spike(self, row: Mapping[str, Any]) -> str | None:
        norm = row.get("grad_norm")
        if norm is None:
            return None
        history = self._grad_norms
        median = statistics.median(history) if len(history) >= self.limits.grad_history else 0.0
        history.append(norm)
        if median <= 0 or norm <= self.limits.grad_spike * median:
            return None
        return (f"gradient norm {norm:.3g} is {norm / median:.3g}x the median so far ({median:.3g}): a bad batch or "
                "an unstable step; check the data around this step, lower --lr or keep --max-grad-norm on")


class NullMonitor:
    """`--no-health-checks`: the same methods, raising nothing."""

    def __init__(self) -> None:
        self.alarms: list[Alarm] = []

    def check(self, row: Mapping[str, Any]) -> list[Alarm]:
        return []

    def replay(self, rows: Iterable[Mapping[str, Any]]) -> None: ...


def _mean_abs_log_ratio(row: Mapping[str, Any], beta: float) -> float:
    """Mean |log pi/pi_ref| over chosen and rejected completions, per sequence: the rewards over beta."""
    return (abs(row["rewards/chosen"]) + abs(row["rewards/rejected"])) / (2 * beta)


def _non_finite(row: Mapping[str, Any]) -> str | None:
    numbers = {k: v for k, v in row.items() if isinstance(v, float)}
    culprits = [k for k in COMPUTED_ORDER if k in numbers and not math.isfinite(numbers[k])]
    culprits += [k for k, v in numbers.items() if k not in COMPUTED_ORDER and not math.isfinite(v)]
    if culprits:
        first = culprits[0]
        where = f" ({WHERE[first]})" if first in WHERE else ""
        return (f"first non-finite value: {first}{where}; also {', '.join(culprits[1:])}" if culprits[1:] else
                f"first non-finite value: {first}{where}") + "; try a lower --lr or --dtype float32"
    if row.get("bad_steps"):
        return (f"{row['bad_steps']:g} step(s) since the last row skipped for a non-finite gradient (the backward "
                "pass; the loss was finite); try a lower --lr, --dtype float32 or --max-grad-norm 1.0")
    return None


def preferred_length_gap(chosen_rewards: Any, rejected_rewards: Any, chosen_lengths: Any, rejected_lengths: Any,
                         ) -> Any:
    """`[pairs]` tensors -> the pairs' sum of sign(chosen - rejected reward) x (chosen - rejected tokens): what the
    metric meter sums for `LENGTH_GAP` (a tie, as at the start when policy == reference, counts 0)."""
    return ((chosen_rewards - rejected_rewards).sign() * (chosen_lengths - rejected_lengths)).sum()


def row_keys(alarms: Sequence[Alarm]) -> dict[str, float]:
    """The `health/<name>` keys a metrics row carries for the alarms it raised (1.0 each)."""
    return {alarm.key: 1.0 for alarm in alarms}


def summary_section(alarms: Sequence[Alarm]) -> str:
    """The "Training health" section of summary.md: one line per alarm, or that none fired."""
    lines = ["## Training health", ""]
    lines += [f"- step {a.step}: **{a.name}**: {a.message}" for a in alarms] or ["No alarm fired."]
    return "\n".join(lines) + "\n"


def append_summary(path: str | Path, alarms: Sequence[Alarm]) -> None:
    """Add `summary_section` to the end of summary.md (written before by `report.write_report`)."""
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write("\n" + summary_section(alarms))
