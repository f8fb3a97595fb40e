"""Stage `models`: one backbone variant into data/00_models/<variant>/.

The folder is in open_clip's local-dir layout.
"""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE
from prefect import flow, get_run_logger, task

from flows._cli import main
from tasks.models import WeightsUnavailable, build_variant
from tasks.params.models import ModelParams
from tasks.schemas.paths import MODELS_DIR


def _worth_retrying(task, task_run, state) -> bool:
    """A flaky download is retried; weights that are simply not there, or a bad spec, are not."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (WeightsUnavailable, ValueError, FileNotFoundError))


@task(name="build-variant", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=_worth_retrying)
def build(variant: str, spec: ModelParams) -> dict:
    return build_variant(variant, spec, MODELS_DIR / variant)


@flow(name="models")
def models(variant: str, spec: ModelParams) -> dict:
    """Convert or fetch the weights, verify them, and write them where open_clip loads them."""
    info = build(variant, spec)
    get_run_logger().info("models[%s]: %s / %s, sha256 %s", variant, info["model_name"],
                          info["pretrained"], info["checkpoint_sha256"][:12])
    return info


if __name__ == "__main__":
    main(lambda p, key: models(key, p.models[key]), {"models": dict[str, ModelParams]},
         keys="models")
