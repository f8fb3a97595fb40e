"""Stage `sweep`: choose the train recipe on the validation classes.

Trains every recipe of params.yaml's `sweep.recipes` on the training classes'
features and scores it on the validation classes, with intervals, into
data/08_sweep/ (sweep.json, sweep.md) and a Prefect artifact. The test classes
are not read. Write the chosen recipe into `train` and run `dvc repro` to
score it, once, on the test classes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows._cli import main
from tasks.params import EvaluateParams, Params, TrainParams
from tasks.schemas import DATA, write_bytes, write_json
from tasks.sweep import ZERO_SHOT_LINE, score_recipe, score_zero_shot, summarise, sweep_markdown
from tasks.train import TrainingInputs, load_training_inputs

SWEEP_DIR = DATA / "08_sweep"


@task(name="train-recipe", cache_policy=NO_CACHE, task_run_name="recipe {name}")
def recipe_task(name: str, train: TrainParams, inputs: TrainingInputs,
                evaluate: EvaluateParams) -> dict:
    return score_recipe(train, inputs, evaluate)


@flow(name="sweep")
def sweep(params: Params) -> dict:
    """Score each recipe on the validation classes and pick the best."""
    log = get_run_logger()
    inputs = load_training_inputs(list(params.models))
    scored = {ZERO_SHOT_LINE: score_zero_shot(inputs, params.evaluate)}
    baseline = "train"  # the train section as it is
    recipes = {baseline: params.train, **{name: params.sweep.recipe(name, params.train)
                                          for name in params.sweep.recipes if name != baseline}}
    for name, train in recipes.items():
        scored[name] = recipe_task(name, train, inputs, params.evaluate)
        log.info("recipe %s: validation mP@5 %.4f", name,
                 scored[name]["scores"]["all"][f"mP@{params.evaluate.k}"])
    summary = summarise(scored, baseline, inputs, dict(params.sweep.recipes), params.evaluate)
    table = sweep_markdown(summary)
    write_json(SWEEP_DIR / "sweep.json", summary)
    write_bytes(SWEEP_DIR / "sweep.md", table.encode("utf-8"))
    create_markdown_artifact(table, key="guie-sweep",
                             description="train recipes on validation classes")
    log.info("sweep (chosen: %s):\n%s", summary["chosen"], table)
    return summary


if __name__ == "__main__":
    main(lambda p, _key: sweep(p))
