"""examples/recipes: each names its source and trains two steps with its own loss and optimiser settings on a
tiny model (the model, data, sizes and device swapped for the test's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpokit import Config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "examples" / "recipes").glob("*.yaml"))
TINY = dict(eval_data=None, eval_fraction=0.1, max_steps=2, batch_size=2, grad_accum=1, eval_every=None,
            save_every=None, dtype="float32", device="cpu", gradient_checkpointing=False, max_length=128,
            max_prompt_length=64, progress=False, cache=False)


def test_the_four_published_runs_are_there():
    assert [r.stem for r in RECIPES] == ["qwen2.5-0.5b-instruct-ultrafeedback", "simpo-llama-3-8b-instruct",
                                         "tulu-3-8b-dpo", "zephyr-7b-beta-dpo"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_cites_its_source_and_trains_two_steps(recipe, tiny_model_dir, pairs_jsonl, tmp_path, one_thread):
    from dpokit import train

    header = recipe.read_text(encoding="utf-8").split("\nmodel:")[0]
    assert "# Source:" in header and re.search(r"# +https://\S+", header), f"{recipe.name} names no source"
    published = Config.from_yaml(recipe)
    cfg = Config.from_yaml(recipe, model=str(tiny_model_dir), data=str(pairs_jsonl), output=str(tmp_path / "run"),
                           **TINY)
    assert (cfg.loss, cfg.beta, cfg.lr, cfg.lr_schedule) == (published.loss, published.beta, published.lr,
                                                             published.lr_schedule)
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row and "step" in row]
    assert [row["step"] for row in steps] == [1, 2] and all(row["loss"] == row["loss"] for row in steps)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
