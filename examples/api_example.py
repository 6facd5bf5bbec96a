"""dpokit from Python: check the data, register a loss, train, read the summary.

    python examples/api_example.py MODEL_DIR PAIRS.jsonl OUTPUT_DIR

MODEL_DIR is a Hugging Face causal LM folder with its tokenizer (typically your SFT model); PAIRS.jsonl holds
{"prompt": ..., "chosen": ..., "rejected": ...} records. tests/test_api.py runs this file as it is.
"""

import sys

import torch

from dpokit import Config, LossOutput, load_pairs, register_loss, train

model, data, output = sys.argv[1:4]

# 1. Look at the data first: format, pair count, anything skipped.
pairs, data_report = load_pairs(data)
print("\n".join(data_report.lines()))


# 2. Your own loss: keyword-only parameters are filled from Config fields of the same name (here beta).
#    pairwise=True: each pair's loss uses that pair only, so training fuses it into the LM head (faster).
@register_loss("hinge_margin", needs_reference=True, pairwise=True)
def hinge_margin(policy, reference, extras, *, beta):
    """SLiC-style hinge on DPO's log-ratio difference: max(0, 1 - beta * (chosen - rejected))."""
    chosen = policy.chosen - reference.chosen          # [pairs] log pi/pi_ref of the chosen completions
    rejected = policy.rejected - reference.rejected    # [pairs]
    losses = torch.relu(1 - beta * (chosen - rejected))
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach())


# 3. Train: the same fields as `dpo train` flags (Config.from_yaml / Config.from_args build it from elsewhere).
cfg = Config(model=model, data=data, output=output, loss="hinge_margin", beta=0.1, lr=5e-6,
             batch_size=4, max_steps=2, max_length=128, max_prompt_length=64,
             report_to="tensorboard")  # or "wandb", or "tensorboard,wandb"
summary = train(cfg)

print(f"held-out reward accuracy {summary.eval_before['rewards/accuracies']:.3f} -> "
      f"{summary.eval_after['rewards/accuracies']:.3f} after {summary.steps} steps in {summary.wall_time_s:.0f} s")
print(f"model and model card in {summary.model_dir}, curves in {summary.curves_path}")
