"""Stage `download`: one source into data/01_raw/<source>/ (files + catalog.parquet).

Fetching is mapped as Prefect tasks with retries: over a source's files or
archives, or over chunks of a URL list; a progress bar shows files, bytes/s
and the ETA. Downloads land in the download cache first, so neither a rerun
nor a retry fetches again what is already there.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from flows._cli import main
from tasks import download as dl
from tasks.fetch import ChecksumMismatch, FetchError, fetch
from tasks.http_guard import ByteLimit, TimeLimit
from tasks.layouts import LayoutError
from tasks.params.sources import (DatasetSource, FashionMnistSource, Fetch, ImageFolderSource,
                                  PackagePhotosSource, SourceParams, UrlsSource)
from tasks.photos import find_photos, photo_dirs
from tasks.schemas.paths import RAW_DIR
from tasks.urls import RowLimit, UrlRow, fetch_urls, read_url_list

render_views = task(dl.render_photo_views, name="render-views", cache_policy=NO_CACHE)
link_imagefolder = task(dl.link_imagefolder, name="link-imagefolder", cache_policy=NO_CACHE)
place = task(dl.place_fetched, name="place-file", cache_policy=NO_CACHE)

URL_CHUNK = 2000  # URLs per Prefect task: one task per image would swamp the API


def _worth_retrying(task, task_run, state) -> bool:
    """Only network trouble is retried (a wrong checksum or a missing file will not fix itself)."""
    exc = state.result(raise_on_failure=False)
    transient = (FetchError, httpx.HTTPError, ConnectionError, TimeoutError)
    return isinstance(exc, transient) and not isinstance(exc, ChecksumMismatch)


fetch_fashion_mnist = task(dl.write_fashion_mnist, name="fetch-fashion-mnist",
                           cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5,
                           retry_condition_fn=_worth_retrying)


@task(name="fetch-file", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=_worth_retrying)
def fetch_one(item: Fetch, cache: Path, bar: tqdm | None = None, fresh: bool = False, *,
              source: str, limit: ByteLimit, time_limit: TimeLimit) -> Path:
    def grow(n: int) -> None:  # each download adds its size as it starts: bytes/s and an ETA
        bar.total = (bar.total or 0) + n
        bar.refresh()

    path = fetch(item.url, item.sha256, cache, progress=bar.update if bar is not None else None,
                 fresh=fresh, on_size=grow if bar is not None else None,
                 source=f"sources.{source}", limit=limit, time_limit=time_limit)
    get_run_logger().info("fetched %s -> %s", item.url, path)
    return path


@task(name="fetch-urls", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=10)
def fetch_url_chunk(rows: list[UrlRow], cache: Path, spec: UrlsSource, source: str,
                    bar: tqdm | None = None) -> list:
    return fetch_urls(rows, cache, concurrency=spec.concurrency, per_host=spec.per_host,
                      retries=spec.retries, timeout_s=spec.timeout_s, backoff_s=spec.backoff_s,
                      on_done=(lambda _: bar.update(1)) if bar is not None else None,
                      limit=ByteLimit(spec.max_image_bytes, f"sources.{source}.max_image_bytes"),
                      allow_private=spec.allow_private_addresses, source=f"sources.{source}",
                      time_limit=TimeLimit(spec.max_image_seconds,
                                           f"sources.{source}.max_image_seconds"))


def _dataset(source: str, spec: DatasetSource, root: Path) -> list[dict]:
    """Fetch, place and read a dataset source; returns its catalog rows.

    Skipped files go to skipped.parquet.
    """
    log = get_run_logger()
    cache = Path(spec.download_cache).resolve()
    items = spec.fetches()
    with tqdm(unit="B", unit_scale=True, desc=f"download[{source}]", mininterval=2.0) as bar:
        limit = ByteLimit(spec.max_download_bytes, f"sources.{source}.max_download_bytes")
        slow = TimeLimit(spec.max_download_seconds, f"sources.{source}.max_download_seconds")
        paths = [f.result() for f in fetch_one.map(items, unmapped(cache), unmapped(bar),
                                                   source=unmapped(source), limit=unmapped(limit),
                                                   time_limit=unmapped(slow))]
    # archives are extracted here
    placed = place.map(paths, items, unmapped(root), unmapped(spec), unmapped(source))
    bases = [b for b in (f.result() for f in placed) if b is not None]
    dataset_root, rows, skips = dl.read_layout(spec.kind, spec, [root] + bases)
    rows, skips = dl.adopt_rows(dataset_root, rows, skips, root)
    dl.write_skips(skips, root)
    for s in skips[:20]:
        log.warning("skipped %s (%s): %s", s.path, s.label, s.reason)
    return rows


def _urls(source: str, spec: UrlsSource, root: Path) -> list[dict]:
    """Fetch a URL list's images; returns catalog rows (failures go to failures.parquet)."""
    log = get_run_logger()
    cache = Path(spec.download_cache).resolve()
    list_limit = ByteLimit(spec.max_list_bytes, f"sources.{source}.max_list_bytes")
    list_time = TimeLimit(spec.max_list_seconds, f"sources.{source}.max_list_seconds")
    listing = fetch_one(Fetch(url=spec.uri, sha256=spec.sha256), cache, fresh=True,  # lists change
                        source=source, limit=list_limit, time_limit=list_time)
    rows = read_url_list(listing, spec.url_column, spec.label_column, shown=spec.uri,
                         limit=RowLimit(spec.max_list_rows, f"sources.{source}.max_list_rows"))
    chunks = [rows[i:i + URL_CHUNK] for i in range(0, len(rows), URL_CHUNK)]
    start = time.perf_counter()
    with tqdm(total=len(rows), unit="img", desc=f"download[{source}]", mininterval=2.0) as bar:
        futures = fetch_url_chunk.map(chunks, unmapped(cache / "urls"), unmapped(spec),
                                      unmapped(source), unmapped(bar))
        fetched = [r for f in futures for r in f.result()]
    catalog, failures = dl.adopt_urls(fetched, root)
    dl.write_failures(failures, root)
    seconds = time.perf_counter() - start
    log.info("download[%s]: %d of %d URLs fetched or cached in %.1f s (%.1f/s), "
             "%d failed (failures.parquet)", source, len(catalog), len(rows), seconds,
             len(rows) / max(seconds, 1e-9), len(failures))
    for f in failures[:20]:
        log.warning("failed %s: %s", f["url"], f["error"])
    return catalog


@flow(name="download")
def download(source: str, spec: SourceParams) -> int:
    """Materialise one source's images and catalog; returns the number of images."""
    log = get_run_logger()
    with dl.staged_dir(RAW_DIR / source) as root:
        if isinstance(spec, PackagePhotosSource):
            # One class per distinct photo, many seeded views of each.
            photos = find_photos(photo_dirs(), spec.exclude, spec.duplicate_threshold)
            log.info("%d distinct photos from %s", len(photos), sorted(photo_dirs()))
            futures = render_views.map(photos, unmapped(root), spec.views, spec.max_side, spec.seed)
            rendered = [f.result() for f in futures]
            rows = [row for photo_rows, _ in rendered for row in photo_rows]
            skips = [skip for _, photo_skips in rendered for skip in photo_skips]
            dl.write_skips(skips, root)  # photos whose views cannot have content
            for s in skips:
                log.warning("left out %s (%s): %s", s.label, s.path, s.reason)
        elif isinstance(spec, FashionMnistSource):
            rows = fetch_fashion_mnist(spec, root, source)
        elif isinstance(spec, ImageFolderSource):
            rows = link_imagefolder(Path(spec.path), root)
        elif isinstance(spec, UrlsSource):
            rows = _urls(source, spec, root)
        else:
            rows = _dataset(source, spec, root)
        if not rows:
            raise LayoutError(f"download[{source}]: no usable images found "
                              "(see skipped/failures tables)")
        table = dl.write_catalog(rows, root, source)
    labels = len(set(table.column("label").to_pylist()))
    log.info("download[%s]: %d images in %d classes -> %s", source, table.num_rows, labels,
             RAW_DIR / source)
    return table.num_rows


if __name__ == "__main__":
    def run(params, key):
        dl.check_source(key, params.sources[key])
        download(key, params.sources[key])

    main(run, {"sources": dict[str, SourceParams]}, keys="sources")
