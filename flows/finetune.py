"""Stage `finetune`: a built backbone -> a fine-tuned one, data/00_finetuned/<run>/.

`python -m flows.finetune <run>` trains run `<run>` of the `finetune` section (its shared
settings with the run's changes) and writes the result in the `models` stage's layout, so
that listed in `variants` (`<run>: finetuned`), `extract`, `train`, `evaluate` and
`export` take it as one more backbone, and `soup` can average it with other runs. A killed
run resumes from its last finished epoch (finetune.cache_dir).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from prefect import flow, get_run_logger
from tqdm import tqdm

from flows._cli import main
from tasks.finetune import finetune as finetune_variant
from tasks.finetune import resolve_device
from tasks.params.base import NAMES, ParamsError
from tasks.params.finetune import FinetuneParams, check_runs
from tasks.schemas.paths import FINETUNED_DIR, MODELS_DIR


@flow(name="finetune")
def finetune(name: str, params: FinetuneParams) -> dict:
    """Fine-tune run `name`'s base variant; one log line and one bar step per epoch."""
    log = get_run_logger()
    run = params.run(name)
    log.info("finetune[%s]: %s from %s, %d epochs on %s", name, run.schedule, run.base,
             run.epochs, resolve_device(run.device))
    start = [time.perf_counter()]
    with tqdm(total=run.epochs, unit="epoch", desc=f"finetune[{name}]") as bar:
        def epoch_done(row: dict[str, Any]) -> None:
            if bar.n == 0 and row["epoch"] > 1:  # resumed: count the epochs already done
                bar.update(row["epoch"] - 1)
                log.info("finetune[%s]: resumed after epoch %d", name, row["epoch"] - 1)
            bar.update(1)
            seconds, start[0] = time.perf_counter() - start[0], time.perf_counter()
            log.info("finetune[%s] epoch %d/%d (%s, %d px): loss %.4f on %d images of %d "
                     "classes, %.1f images/s", name, row["epoch"], run.epochs, row["phase"],
                     row["image_size"], row["loss"], row["images"], row["classes"],
                     row["images"] / max(seconds, 1e-9))

        result = finetune_variant(run, name, MODELS_DIR / run.base, FINETUNED_DIR / name,
                                  progress=epoch_done)
    losses = [row["loss"] for row in result.history]
    log.info("finetune[%s]: wrote %s; loss %.4f -> %.4f over %d epochs", name,
             FINETUNED_DIR / name, losses[0], losses[-1], len(losses))
    return {"run": name, "base": run.base, "schedule": run.schedule, "loss": losses}


def run(params: Any, _key: None) -> dict:
    """The run named on the command line, after checking every run against `models`."""
    names = sorted(params.finetune.runs)
    if len(sys.argv) != 2 or sys.argv[1] not in names:
        given = sys.argv[1] if len(sys.argv) > 1 else None
        raise ParamsError(f"finetune run {given!r}: allowed are {names} (finetune.runs)")
    try:
        check_runs(params.finetune, list(params.models))
    except ValueError as exc:
        raise ParamsError(f"params.yaml: {exc}") from None
    return finetune(sys.argv[1], params.finetune)


if __name__ == "__main__":
    main(run, {"models": NAMES, "finetune": FinetuneParams})
