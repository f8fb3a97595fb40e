"""Choose a train recipe on the validation classes, never on the test classes.

Every recipe is trained on the training classes and scored on the validation
classes' queries against their index, with the class-bootstrap interval of
its mP@5 and the paired interval of its difference from the baseline recipe
(`train` as params.yaml has it). The choice is the recipe with the best
validation mP@5 among those whose paired interval lies above 0, or the
baseline when none does; the test classes are scored once, by `evaluate`,
after the choice is written into `train`.
"""

from __future__ import annotations

import numpy as np

from tasks.evaluate import fit_pca, score_line
from tasks.features import GroupData, require_images
from tasks.metrics import paired_bootstrap_difference
from tasks.params.evaluate import EvaluateParams
from tasks.params.train import TrainParams
from tasks.train import TrainingInputs, train_head
from tasks.heads import embed_with_head

ZERO_SHOT_LINE = "zero-shot PCA of the concatenation (reference)"


def validation_group(inputs: TrainingInputs) -> GroupData:
    """The validation classes, which every recipe is scored on: they must not be empty."""
    return require_images(inputs.validation, "validation")


def score_recipe(params: TrainParams, inputs: TrainingInputs, evaluate: EvaluateParams) -> dict:
    """Train one recipe and score it on the validation classes."""
    result = train_head(inputs.train, inputs.val, params, inputs.validation, inputs.class_images)
    line = score_line(lambda x: embed_with_head(result.head, x), validation_group(inputs), evaluate)
    return {"per_query": line["per_query"], "scores": line["scores"],
            "epochs_run": result.metrics["epochs_run"], "epoch_kept": result.metrics["epoch_kept"]}


def score_zero_shot(inputs: TrainingInputs, evaluate: EvaluateParams) -> dict:
    """The zero-shot PCA line of the concatenated features on the validation classes."""
    line = score_line(fit_pca(inputs.train.embeddings, evaluate.pca_dim), validation_group(inputs),
                      evaluate)
    return {"per_query": line["per_query"], "scores": line["scores"]}


def summarise(scored: dict[str, dict], baseline: str, inputs: TrainingInputs,
              changes: dict[str, dict], evaluate: EvaluateParams) -> dict:
    """Every recipe's validation scores, its paired difference from `baseline`, and the choice."""
    k = evaluate.k
    classes = inputs.validation.query.class_ids
    recipes = {}
    for name, s in scored.items():
        diff, low, high = paired_bootstrap_difference(
            s["per_query"], scored[baseline]["per_query"], classes,
            evaluate.bootstrap_resamples, evaluate.seed, evaluate.confidence)
        recipes[name] = {"changes": changes.get(name, {}), "validation": s["scores"],
                         "minus_baseline": {"difference": round(diff, 4), "low": round(low, 4),
                                            "high": round(high, 4)},
                         **{key: s[key] for key in ("epochs_run", "epoch_kept") if key in s}}
    # A recipe replaces the baseline only when it is better beyond doubt: its paired
    # interval lies above 0. Otherwise every sweep would chase the noise of the last.
    better = [name for name in scored if name not in (ZERO_SHOT_LINE, baseline)
              and recipes[name]["minus_baseline"]["low"] > 0]
    chosen = max(better, key=lambda name: scored[name]["scores"]["all"][f"mP@{k}"],
                 default=baseline)
    unscored = np.isnan(scored[baseline]["per_query"])
    return {"k": k, "baseline": baseline, "chosen": chosen,
            "validation_classes": int(len(np.unique(classes[~unscored]))),
            "validation_queries": int((~unscored).sum()), "recipes": recipes}


def sweep_markdown(summary: dict) -> str:
    """The sweep as a table: validation mP@k [interval] and the paired difference."""
    k = summary["k"]
    out = [f"| recipe | changes | validation mP@{k} | minus `{summary['baseline']}` | epochs |",
           "|---|---|---|---|---|"]
    ranked = sorted(summary["recipes"].items(),
                    key=lambda item: -item[1]["validation"]["all"][f"mP@{k}"])
    for name, r in ranked:
        score, diff = r["validation"]["all"], r["minus_baseline"]
        changes = ", ".join(f"{key}={value}" for key, value in r["changes"].items()) or "-"
        epochs = (f"{r['epoch_kept']}/{r['epochs_run']}" if "epochs_run" in r else "-")
        mark = " (chosen)" if name == summary["chosen"] else ""
        out.append(f"| {name}{mark} | {changes} | {score[f'mP@{k}']:.4f} "
                   f"[{score['low']:.3f}, {score['high']:.3f}] | {diff['difference']:+.4f} "
                   f"[{diff['low']:+.3f}, {diff['high']:+.3f}] | {epochs} |")
    return "\n".join(out) + (
        f"\n\n{summary['validation_queries']} queries of {summary['validation_classes']} "
        "validation classes; intervals are 95% class-bootstrap, the difference is paired. "
        "Epochs: kept/run.\n")
