"""What `dvc repro` would consider, asked of DVC itself: the stages, their order, and staleness.

The pipeline flow runs each stage as its own Prefect task, so it needs DVC's plan up front
(which stages, each one's upstream) and, just before a stage would start, DVC's own check of
whether it is stale *now*, after its upstream ran: an upstream stage that rewrote its outputs
byte-for-byte leaves its downstream up to date, exactly as in `dvc repro`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dvc.dvcfile import PROJECT_FILE
from dvc.repo import Repo
from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro


@dataclass(frozen=True)
class ReproPlan:
    """Stages in the order `dvc repro` visits them (upstream first), each with its upstream
    stages and its outputs' paths."""

    upstream: dict[str, tuple[str, ...]]
    outs: dict[str, tuple[Path, ...]]


def plan_stages(targets: list[str] | None = None) -> ReproPlan:
    """The stages `dvc repro <targets>` would consider (all of dvc.yaml when none): the targets
    and everything they depend on, foreach stages expanded (`extract@lite0`), frozen stages cut
    off from their upstream, named as DVC addresses them."""
    with Repo(_wait_for_lock=True) as repo, repo.lock:
        graph = get_active_graph(repo.index.graph)
        stages = plan_repro(graph, collect_stages(repo, targets or [PROJECT_FILE]))
        planned = set(stages)
        # DVC's edges point from a stage to the stages it depends on
        upstream = {s.addressing: tuple(u.addressing for u in graph.successors(s) if u in planned)
                    for s in stages}
        outs = {s.addressing: tuple(Path(o.fs_path) for o in s.outs) for s in stages}
    return ReproPlan(upstream, outs)


def is_stale(stage: str) -> bool:
    """Whether `dvc repro --single-item <stage>` would run the stage now: its command, params,
    dependencies or outputs differ from dvc.lock, outputs are missing, or it is always_changed.
    Waits for DVC's repo lock, which a running `dvc repro` holds except while its command runs."""
    with Repo(_wait_for_lock=True) as repo, repo.lock:
        (found,) = repo.stage.collect(stage)
        return found.changed()
