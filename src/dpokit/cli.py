"""The `dpo` command: parse, run, and turn user errors into one line and an exit status.

Exit status: 0 ok, 2 usage or input error, 1 training failure, 128 + the signal's number when stopped by a
signal (130 for Ctrl-C, SIGINT; 143 for SIGTERM), after saving a checkpoint where a training run had begun.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from . import __version__
from .config import SFT_DEFAULTS, add_arguments, add_field_arguments, check_settings, from_namespace
from .errors import DPOError, ReportedElsewhere


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo", description="Align a causal LM to preference pairs with DPO and its family of losses.")
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="train a policy on preference pairs (default: the synthetic demo)",
                                description="Train a policy on preference pairs. Every flag can also be set in "
                                            "the --config YAML file; the command line wins.")
    add_arguments(train)
    sft = commands.add_parser("sft", help="supervised fine-tuning on prompt+completion (or text) records",
                              description="Supervised fine-tuning: `dpo train` with --loss sft (NLL of the "
                                          "completion per token, no reference) and output runs/sft. Same flags, "
                                          "outputs and checkpoints as `dpo train`; preference files train on chosen.")
    add_arguments(sft)
    online = commands.add_parser(
        "online", help="iterative DPO: sample from the policy, score with a reward, pair, train; round after round",
        description="Online / iterative DPO: each round samples --samples-per-prompt completions of the round's "
                    "prompts from the current policy, scores them (--reward, --reward-model), pairs them as ranked "
                    "data (--pairs) into OUTPUT/rounds/round-N.jsonl and trains on them as `dpo train` does (every "
                    "train flag applies to each round). A re-run skips finished rounds and resumes the one under way.")
    add_arguments(online)
    _add_online_arguments(online)
    _add_generate_arguments(commands.add_parser(
        "generate", help="sample completions of prompts from a saved model, to JSONL",
        description="Batched sampling from a saved model; the same --seed gives the same samples."))
    _add_eval_arguments(commands.add_parser(
        "eval", help="reward accuracy on pairs; reward, win rate and KL of samples vs the reference",
        description="Evaluate a policy against its reference: on preference pairs (--data), DPO's implicit reward "
                    "accuracy and margins; on prompts (--prompts) with --reward module:function, the mean reward "
                    "of samples, their win rate over the reference's samples, and KL(policy || reference)."))
    _add_data_arguments(commands.add_parser("data", help="look at a data file before training on it"))
    _add_plan_arguments(commands.add_parser(
        "plan", help="predict a run's peak memory per process and FLOPs per step, and whether it fits",
        description="Predict the peak memory per process of `dpo train` with the same flags (its parts: weights, "
                    "gradients, AdamW states, reference, activations, LM-head chunk, temporaries, framework) and "
                    "the FLOPs per step, from the model's config (no weights loaded) and the data's token lengths "
                    "(--data) or the length limits. With --memory, whether it fits and the cheapest flags that "
                    "make it fit."))
    report = commands.add_parser(
        "report", help="compare runs: curves on shared axes (PNG) and a summary table (markdown)",
        description="Plot the metrics.jsonl of one or several runs on shared axes (train solid, eval dashed) "
                    "and summarize them in a markdown table: final and best eval metrics, steps, pairs/s, wall time.")
    report.add_argument("runs", nargs="+", metavar="RUN", help="a `dpo train` output folder or its metrics.jsonl")
    report.add_argument("--out", default="report.png",
                        help="PNG to write; the table goes next to it as .md and to stdout (default: report.png)")
    return parser


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    inspect = parser.add_subparsers(dest="data_command", metavar="inspect", required=True).add_parser(
        "inspect", help="pairs, format, token lengths, truncation, duplicates and examples with the boundary marked")
    inspect.add_argument("file", metavar="FILE", help="data file, folder, save_to_disk folder or hub dataset name, "
                         "or a mixture as --data takes it (a.jsonl:0.7,b.parquet:0.3)")
    inspect.add_argument("--model", help="model or tokenizer folder: lengths in tokens and truncation counts")
    inspect.add_argument("--examples", type=int, default=2, help="examples to print (default: 2)")
    add_field_arguments(inspect, ("data_split", "format", "columns", "pairs", "max_pairs", "skip_invalid",
                                  "max_length", "max_prompt_length", "max_completion_length", "truncation_mode"),
                        with_defaults=True)


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--nproc", type=int, default=1, help="processes (torchrun --nproc-per-node; default: 1)")
    parser.add_argument("--memory", help="memory per process to fit in, e.g. 80GB, 24GiB, 512MB (binary units)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object (sizes in bytes)")


def _plan(args: argparse.Namespace) -> None:
    import json

    from .plan import describe, parse_memory, plan_run

    budget = parse_memory(args.memory) if args.memory is not None else None
    if args.nproc < 1:
        raise DPOError(f"--nproc must be positive, got {args.nproc}")
    plan = plan_run(from_namespace(args), nproc=args.nproc, budget=budget)
    print(json.dumps(plan.to_dict()) if args.json else "\n".join(describe(plan)))


def _add_sampling_arguments(parser: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    parser.add_argument("--model", required=model_required, help="model folder (save_pretrained), with its tokenizer")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per completion (default: 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default: 1)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights dtype")


def _sampling_options(args: argparse.Namespace) -> dict[str, object]:
    for name in ("num_samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise DPOError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise DPOError("--temperature must be >= 0 and --top-p in (0, 1]")
    return dict(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, batch_size=args.batch_size, device=args.device, dtype=args.dtype)


def _add_online_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, help="JSONL/JSON/Parquet file of records with a prompt field "
                                                         "(text or chat messages)")
    parser.add_argument("--reward", action="append", default=[], help="module:function or file.py:function, "
                        "called as f(prompts, completions) -> one float per completion (repeat for several)")
    parser.add_argument("--reward-model", action="append", default=[], help="folder of a sequence-classification "
                        "reward model (num_labels=1; its chat template applied) (repeat for several)")
    parser.add_argument("--reward-weights", help="comma-separated weight per judge, --reward ones first, then "
                                                 "--reward-model ones (default: all 1)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="completions per prompt per round, "
                                                                          ">= 2 (default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of sample, score, train (default: 3)")
    parser.add_argument("--prompts-per-round", type=int, help="prompts per round, drawn in seeded passes over the "
                                                              "file (default: all, every round)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per completion (default: 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    parser.add_argument("--sample-batch-size", type=int, default=32, help="sequences per sampling and reward-model "
                                                                          "forward pass (default: 32)")
    parser.add_argument("--missing-eos-penalty", type=float, help="subtracted from the score of a completion cut "
                                                                  "at --max-new-tokens (default: none)")
    parser.add_argument("--reward-device", help="device of the reward models (default: --device)")
    parser.add_argument("--on-policy", action="store_true", help="online DPO: every optimizer step samples its "
                        "own --batch-size x --grad-accum prompts from the current policy, judges, pairs and trains "
                        "on them, in one run (one optimizer) written to OUTPUT (default: rounds)")


def _online_options(args: argparse.Namespace, *, ref_update: str) -> object:
    from .online import OnlineOptions

    weights = None
    if args.reward_weights:
        try:
            weights = [float(w) for w in args.reward_weights.split(",")]
        except ValueError:
            raise DPOError(f"--reward-weights: expected comma-separated numbers, got {args.reward_weights!r}") from None
    return OnlineOptions(
        rewards=args.reward, reward_models=args.reward_model, reward_weights=weights,
        samples_per_prompt=args.samples_per_prompt, rounds=args.rounds, prompts_per_round=args.prompts_per_round,
        ref_update=ref_update, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, sample_batch_size=args.sample_batch_size, missing_eos_penalty=args.missing_eos_penalty,
        reward_device=args.reward_device, on_policy=args.on_policy)


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_sampling_arguments(parser)
    parser.add_argument("--prompts", required=True, help="JSONL/JSON/Parquet file of records with a prompt field")
    parser.add_argument("--field", default="prompt", help="the record field holding the prompt (default: prompt)")
    parser.add_argument("--out", required=True, help="JSONL file to write: prompt, completion, indices")


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _add_sampling_arguments(parser, model_required=False)
    parser.add_argument("--run", metavar="OUTPUT", help="a `dpo train` output folder: its model/, reference, "
                        "tokenizer, beta, length limits and (without --data/--prompts) held-out pairs, from its "
                        "config.yaml; flags given as well win")
    parser.add_argument("--ref-model", help="the reference model folder (e.g. the SFT model)")
    parser.add_argument("--data", help="held-out preference pairs: reward accuracy and margins")
    add_field_arguments(parser, ("beta", "max_length", "max_prompt_length"))
    parser.add_argument("--prompts", help="prompts (records with a prompt field) to sample from both models")
    parser.add_argument("--reward", help="module:function or file.py:function, called as f(prompts, completions) "
                                         "-> one float per completion")
    parser.add_argument("--out", help="write the metrics here as JSON")
    parser.add_argument("--samples-out", help="write the policy's scored samples here as JSONL")


def _eval_settings(args: argparse.Namespace) -> dict[str, object]:
    """Models and scoring settings of `dpo eval`: the run's (--run), under the flags given (beta, lengths default
    to `dpo train`'s when neither says)."""
    from .config import Config
    from .evaluation import run_settings

    settings: dict[str, object] = {name: getattr(Config, name) for name in ("beta", "max_length", "max_prompt_length")}
    if args.run:
        settings |= run_settings(args.run)
    settings |= {name: getattr(args, name) for name in ("beta", "max_length", "max_prompt_length")
                 if hasattr(args, name)}
    settings |= {name: value for name, value in (("model", args.model), ("ref_model", args.ref_model)) if value}
    if "model" not in settings or "ref_model" not in settings:
        raise DPOError("eval: give --run OUTPUT (a `dpo train` output folder), or --model and --ref-model")
    return settings


def _reject_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]) -> None:
    """Exit with the usage of the (sub)command the unknown arguments were given to, and the nearest flag.

    argparse itself reports them with the top-level usage (`dpo [-h] [--version] COMMAND`), which says nothing
    about the flags the user was typing.
    """
    command = _command_parser(parser, args)
    flags = [s for action in command._actions for s in action.option_strings if s.startswith("--")]
    nearest = [match[0] for word in unknown if word.startswith("--")
               for match in [difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)] if match]
    hint = f" (did you mean {' / '.join(nearest)}?)" if nearest else ""
    command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand parser chosen in `args` (`dpo data inspect` -> the `inspect` parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None):
            return _command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
        _reject_unknown(parser, args, unknown)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    try:
        if args.command in ("eval", "data"):  # train and sft validate their whole Config
            check_settings(args)
        if args.command == "train":
            from .loop import train

            train(from_namespace(args))
        elif args.command == "sft":
            from .loop import train

            train(from_namespace(args, defaults=SFT_DEFAULTS))
        elif args.command == "online":
            from .online import ONLINE_DEFAULTS, online

            if "data" in vars(args):
                raise DPOError("--data is not used by online: the prompts are --prompts, and each round trains "
                               "on its own pairs")
            cfg = from_namespace(args, defaults={**ONLINE_DEFAULTS, "data": args.prompts})
            online(cfg, _online_options(args, ref_update=cfg.ref_update))
        elif args.command == "plan":
            _plan(args)
        elif args.command == "generate":
            from .generate import generate_file

            generate_file(model=args.model, prompts=args.prompts, out=args.out, field=args.field,
                          **_sampling_options(args))
        elif args.command == "eval":
            from .evaluation import evaluate_models

            evaluate_models(**_eval_settings(args), data=args.data, prompts=args.prompts, reward=args.reward,
                            out=args.out, samples_out=args.samples_out, **_sampling_options(args))
        elif args.command == "report":
            from .report import write_report

            png = Path(args.out)
            print(write_report(args.runs, png, png.with_suffix(".md")), end="")
            print(f"wrote {png} and {png.with_suffix('.md')}", file=sys.stderr)
        elif args.command == "data":
            from .data.inspect import inspect
            from .models import load_tokenizer

            print("\n".join(inspect(
                args.file, tokenizer=load_tokenizer(args.model) if args.model else None, format=args.format,
                columns=args.columns, split=args.data_split, pairs=args.pairs, max_pairs=args.max_pairs,
                skip_invalid=args.skip_invalid, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                max_completion_length=args.max_completion_length, truncation_mode=args.truncation_mode,
                examples=args.examples)))
    except DPOError as err:
        # A status above 128 is a signal (`checkpoint.Interrupted`): a stop the user asked for, not an error.
        if not isinstance(err, ReportedElsewhere):
            print(f"dpo {args.command}: {'' if err.exit_code > 128 else 'error: '}{err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print(f"dpo {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
