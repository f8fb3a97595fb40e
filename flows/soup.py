"""Stage `soup`: fine-tuned runs of one backbone (data/00_finetuned/<run>/) ->
data/00_soups/<name>/, their weight average (a model soup) in the models stage's layout, so
that listed in `variants` (`<name>: soups`) extract and export load it as any backbone."""

from __future__ import annotations

import faiss
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows._cli import main
from tasks.params.evaluate import EvaluateParams
from tasks.params.extract import ExtractParams
from tasks.params.soup import SoupParams, SoupSpec
from tasks.schemas.paths import FINETUNED_DIR, MANIFEST, SHARDS_DIR, SOUPS_DIR
from tasks.soup import greedy_soup, uniform_soup
from tasks.soup_score import score_settings, validation_scorer

# DVC caches the soup folder: Prefect's own result caching stays off.
make_uniform = task(uniform_soup, name="uniform-soup", cache_policy=NO_CACHE)
make_greedy = task(greedy_soup, name="greedy-soup", cache_policy=NO_CACHE)


@flow(name="soup")
def soup(name: str, spec: SoupSpec, evaluate: EvaluateParams, extract: ExtractParams) -> dict:
    """Average the runs into one variant folder; a greedy soup keeps a run only if the
    validation classes' mP@5 rises (the test classes are never read)."""
    log = get_run_logger()
    out = SOUPS_DIR / name
    runs = [FINETUNED_DIR / run for run in spec.runs]
    if spec.kind == "uniform":
        info = make_uniform(runs, out)
    else:
        # Scored on the CPU (fp32, extract.cpu_threads threads; search on evaluate.threads)
        # with only the settings dvc.yaml lists for the stage (tasks.soup_score.SCORE_FIELDS).
        scoring, embedding = score_settings(evaluate, extract)
        faiss.omp_set_num_threads(scoring.threads)
        score = validation_scorer(SHARDS_DIR, MANIFEST, scoring, embedding, spec.pca_fit_images)
        info = make_greedy(runs, score, out)
        record = info["soup"]["greedy"]
        for t in record["tries"]:
            log.info("soup[%s]: %d runs: validation mP@5 %.4f, %s", name, len(t["runs"]),
                     t["score"], "kept" if t["added"] else "dropped")
    log.info("soup[%s]: %s soup of %d runs -> %s (sha256 %s)", name, spec.kind,
             len(info["soup"]["runs"]), out, info["checkpoint_sha256"][:12])
    return info


if __name__ == "__main__":
    main(lambda p, key: soup(key, p.soup[key], p.evaluate, p.extract),
         {"soup": SoupParams, "evaluate": EvaluateParams, "extract": ExtractParams}, keys="soup")
