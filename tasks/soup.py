"""Model soups: weight averages of fine-tuned runs of one backbone (Wortsman et al., 2022).

Runs and soups are variant folders in the layout tasks/models.py writes, so extract, export
and `local-dir:` load a soup like any backbone (a greedy soup's score: tasks/soup_score.py).
A run is checked before any value is used: the first run's config, keys, shapes and dtypes,
finite floats, a model.json whose hash is its weights', no run given twice. The mean is taken
in float64 over each element's values sorted by value, then cast back to the runs' dtype:
the sorted order fixes the additions, so the soup is the same bytes in any run order, and
float64 keeps their rounding far below the dtype's. Tensors that are not real floats
(integers, bools) must be equal in every run, but BatchNorm's `num_batches_tracked` step
counters (read only in training, by momentum=None) take the max.
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tasks.backbone import CONFIG_NAME, WEIGHTS_NAME
from tasks.schemas.io import atomic_path, scratch_dir, sha256_file, write_bytes, write_json

COUNTER_SUFFIX = "num_batches_tracked"  # BatchNorm's step counters: the max, not the mean
CHUNK = 1 << 22  # elements averaged at a time: the float64 scratch is runs x 32 MiB at most
INFO_KEYS = ("model_name", "image_size", "dim")  # what a soup's model.json takes from its runs


class SoupError(ValueError):
    """A run cannot go into a soup; the message names the run and, where one is, the key."""


@dataclass(frozen=True)
class Run:
    """One checked run folder: its config, its model.json and its weights' sha256."""
    path: Path
    config: dict
    info: dict
    sha256: str


def check_runs(run_dirs: Sequence[Path | str]) -> list[Run]:
    """The runs, each checked against its own model.json and against the first run: the same
    config, model name, image size and dim; the same tensor names, shapes and dtypes (read
    from the safetensors headers, before any value). Raises SoupError naming run and key."""
    if not run_dirs:
        raise SoupError("a soup needs at least one run")
    runs: list[Run] = []
    for d in map(Path, run_dirs):
        files = [d / CONFIG_NAME, d / WEIGHTS_NAME, d / "model.json"]
        if missing := [f.name for f in files if not f.is_file()]:
            raise SoupError(f"run {d}: not a variant folder, {missing} missing")
        config, info = (_json_object(d, f) for f in (files[0], files[2]))
        if lacks := [k for k in ("checkpoint_sha256", *INFO_KEYS) if k not in info]:
            raise SoupError(f"run {d}: model.json lacks {lacks}")
        digest = sha256_file(files[1])
        if info.get("checkpoint_sha256") != digest:
            raise SoupError(f"run {d}: model.json says checkpoint_sha256 "
                            f"{info['checkpoint_sha256']!r} but the weights' sha256 is "
                            f"{digest}: the folder was changed after it was written")
        for other in runs:
            if other.path.resolve() == d.resolve() or other.sha256 == digest:
                raise SoupError(f"run {d}: the same weights as run {other.path}; a run given "
                                "twice would count twice in the mean")
        runs.append(Run(d, config, info, digest))
    for run in runs[1:]:
        for name, mine, theirs in [(CONFIG_NAME, run.config, runs[0].config), *(
                (f"model.json {k}", run.info[k], runs[0].info[k]) for k in INFO_KEYS)]:
            if mine != theirs:
                raise SoupError(f"run {run.path}: its {name} differs from run {runs[0].path}'s;"
                                " only runs of one architecture can be averaged")
        bases = [r.info.get("base_checkpoint_sha256") for r in (runs[0], run)]
        if bases[0] != bases[1]:
            raise SoupError(f"run {run.path} was fine-tuned from other weights than run "
                            f"{runs[0].path} (base_checkpoint_sha256 {bases[1]} against "
                            f"{bases[0]}): a soup averages runs of one starting point")
    _check_headers(runs)
    return runs


def _json_object(run: Path, path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, dict):
        raise SoupError(f"run {run}: {path.name} is not a JSON object")
    return value


def _header(run: Run) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, dtype) from the safetensors header; no tensor is read."""
    try:
        with safe_open(run.path / WEIGHTS_NAME, framework="pt") as f:
            return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own errors on a malformed file
        raise SoupError(f"run {run.path}: {WEIGHTS_NAME} is not a valid safetensors file "
                        f"({exc})") from None


def _check_headers(runs: list[Run]) -> None:
    first = _header(runs[0])
    for run in runs[1:]:
        mine = _header(run)
        if missing := sorted(first.keys() - mine.keys()):
            raise SoupError(f"run {run.path}: key {missing[0]!r} missing ({len(missing)} keys "
                            f"of run {runs[0].path} missing in all)")
        if extra := sorted(mine.keys() - first.keys()):
            raise SoupError(f"run {run.path}: extra key {extra[0]!r} ({len(extra)} keys that "
                            f"run {runs[0].path} lacks)")
        for key, (shape, dtype) in first.items():
            if mine[key] != (shape, dtype):
                raise SoupError(f"run {run.path}: key {key!r} has shape {mine[key][0]} and "
                                f"dtype {mine[key][1]}, run {runs[0].path} {shape} and {dtype}")


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean in float64 of the values sorted by value, cast back to their dtype."""
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty(flat[0].numel(), dtype=tensors[0].dtype)
    for a in range(0, out.numel(), CHUNK):
        block = torch.stack([f[a:a + CHUNK].double() for f in flat]).sort(dim=0).values
        out[a:a + CHUNK] = (block.sum(dim=0) / len(flat)).to(out.dtype)
    return out.reshape(tensors[0].shape)


def average_runs(runs: list[Run]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The soup's state dict, read one tensor of each run at a time, and the counters that
    differed across runs (name -> the count taken)."""
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(r.path / WEIGHTS_NAME, framework="pt"))
                 for r in runs]
        state, counters = {}, {}
        for key in sorted(files[0].keys()):
            tensors = [f.get_tensor(key) for f in files]
            if tensors[0].is_floating_point():
                for run, t in zip(runs, tensors):
                    if not torch.isfinite(t).all():
                        raise SoupError(f"run {run.path}: key {key!r} has non-finite values "
                                        f"({int((~torch.isfinite(t)).sum())} of {t.numel()})")
                state[key] = _mean(tensors)
            elif all(torch.equal(tensors[0], t) for t in tensors[1:]):
                state[key] = tensors[0]
            elif key.endswith(COUNTER_SUFFIX) and tensors[0].numel() == 1:
                state[key] = torch.stack(tensors).max(dim=0).values
                counters[key] = int(state[key])
            else:
                run = next(r for r, t in zip(runs, tensors) if not torch.equal(tensors[0], t))
                raise SoupError(f"run {run.path}: non-float tensor {key!r} differs from run "
                                f"{runs[0].path}'s; only float tensors are averaged")
        return state, counters


def write_soup(runs: list[Run], out_dir: Path | str, kind: str, extra: dict | None = None,
               ) -> dict:
    """Average `runs` into a variant folder `out_dir`; returns its model.json. The weights are
    written first, model.json last, each atomically: a folder whose model.json hash matches
    its weights is complete."""
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == r.path.resolve() for r in runs):
        raise SoupError(f"soup folder {out_dir} is one of its runs: it would overwrite it")
    state, counters = average_runs(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").unlink(missing_ok=True)  # incomplete until rewritten
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"format": "pt"})
    write_bytes(out_dir / CONFIG_NAME, (runs[0].path / CONFIG_NAME).read_bytes())
    info = {**{k: runs[0].info[k] for k in INFO_KEYS},
            "pretrained": f"soup:{kind}:{len(runs)}", "checkpoint_sha256":
            sha256_file(out_dir / WEIGHTS_NAME),
            "soup": {"kind": kind, "runs": [{"path": str(r.path), "checkpoint_sha256": r.sha256,
                                             "pretrained": r.info.get("pretrained")}
                                            for r in runs],
                     "integer_tensors": f"equal in every run; *.{COUNTER_SUFFIX}: the max",
                     "counters_that_differed": len(counters), **(extra or {})}}
    write_json(out_dir / "model.json", info)
    return info


def uniform_soup(run_dirs: Sequence[Path | str], out_dir: Path | str) -> dict:
    """The element-wise mean of two or more runs' weights, as a variant folder; returns its
    model.json (provenance: the runs, their weights' sha256, the kind of soup)."""
    if len(run_dirs) < 2:
        raise SoupError(f"a uniform soup needs at least two runs, got {len(run_dirs)}")
    return write_soup(check_runs(run_dirs), out_dir, "uniform")


def greedy_soup(run_dirs: Sequence[Path | str], score: Callable[[Path], float],
                out_dir: Path | str) -> dict:
    """Wortsman et al.'s greedy soup: runs ranked by their own score (best first; a tie keeps
    the listed order), the soup starts as the best run and takes each next run only if the
    soup's score strictly rises. `score` takes a variant folder: it scores what extract will
    load, anywhere the folder can be read. Every run's tensors are checked before anything
    is scored. Returns the soup's model.json; `soup.greedy` records every score tried."""
    runs = check_runs(run_dirs)
    average_runs(runs)  # every value checked before minutes of scoring
    out_dir = Path(out_dir)

    def scored(folder: Path) -> float:
        value = float(score(folder))
        if not math.isfinite(value):
            raise SoupError(f"score of {folder} is {value}: a soup cannot be chosen on it")
        return value

    own = [scored(r.path) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: -own[i])
    chosen, best = [order[0]], own[order[0]]
    tries = [{"runs": [str(runs[order[0]].path)], "score": best, "added": True}]
    for i in order[1:]:
        candidate = [runs[j] for j in chosen + [i]]
        with scratch_dir(out_dir.parent, f".{out_dir.name}.try-") as folder:
            write_soup(candidate, folder / "soup", "greedy-candidate")
            value = scored(folder / "soup")
        tries.append({"runs": [str(r.path) for r in candidate], "score": value,
                      "added": value > best})
        if value > best:
            chosen, best = chosen + [i], value
    record = {"individual": {str(r.path): s for r, s in zip(runs, own)}, "tries": tries,
              "chosen": [str(runs[i].path) for i in chosen], "score": best}
    return write_soup([runs[i] for i in chosen], out_dir, "greedy", {"greedy": record})
