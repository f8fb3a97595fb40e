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
from tasks.params.evaluate import EvaluateParams
from tasks.params.base import ParamsError
from tasks.params.variants import VariantsParams, head_backbones
from tasks.params.sweep import SweepParams, check_recipes
from tasks.params.train import TrainParams
from tasks.schemas.io import write_bytes, write_json
from tasks.schemas.paths import DATA
from tasks.sweep import ZERO_SHOT_LINE, score_recipe, score_zero_shot, summarise, sweep_markdown
from tasks.train import TrainingInputs, load_training_inputs

SWEEP_DIR = DATA / "08_sweep"


@task(name="train-recipe", cache_policy=NO_CACHE, task_run_name="recipe {name}")
def recipe_task(name: str, train: TrainParams, inputs: TrainingInputs,
                evaluate: EvaluateParams) -> dict:
    return score_recipe(train, inputs, evaluate)


@flow(name="sweep")
def sweep(variants: list[str], train: TrainParams, evaluate: EvaluateParams,
          params: SweepParams) -> dict:
    """Score each recipe on the validation classes and pick the best."""
    log = get_run_logger()
    inputs = load_training_inputs(variants)
    scored = {ZERO_SHOT_LINE: score_zero_shot(inputs, evaluate)}
    baseline = "train"  # the train section as it is
    recipes = {baseline: train, **{name: params.recipe(name, train)
                                   for name in params.recipes if name != baseline}}
    for name, recipe in recipes.items():
        scored[name] = recipe_task(name, recipe, inputs, evaluate)
        log.info("recipe %s: validation mP@5 %.4f", name,
                 scored[name]["scores"]["all"][f"mP@{evaluate.k}"])
    summary = summarise(scored, baseline, inputs, dict(params.recipes), evaluate)
    table = sweep_markdown(summary)
    write_json(SWEEP_DIR / "sweep.json", summary)
    write_bytes(SWEEP_DIR / "sweep.md", table.encode("utf-8"))
    create_markdown_artifact(table, key="guie-sweep",
                             description="train recipes on validation classes")
    log.info("sweep (chosen: %s):\n%s", summary["chosen"], table)
    return summary


if __name__ == "__main__":
    def run(p, _key: None) -> None:
        try:
            check_recipes(p.sweep, p.train)
        except ValueError as exc:
            raise ParamsError(f"params.yaml: {exc}") from None
        sweep(head_backbones(p.variants, p.train.backbones), p.train,
              p.evaluate, p.sweep)

    main(run, {"variants": VariantsParams, "train": TrainParams, "evaluate": EvaluateParams,
               "sweep": SweepParams})
