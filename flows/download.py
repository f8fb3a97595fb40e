"""Stage `download`: one source into data/01_raw/<source>/ (files + catalog.parquet)."""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import NO_CACHE
from prefect import flow, get_run_logger, task, unmapped

from flows._cli import main
from tasks import download as dl
from tasks.params import FashionMnistSource, ImageFolderSource, PackagePhotosSource, SourceParams
from tasks.photos import find_photos, photo_dirs
from tasks.schemas import RAW_DIR

render_views = task(dl.render_photo_views, name="render-views", cache_policy=NO_CACHE)
fetch_fashion_mnist = task(dl.write_fashion_mnist, name="fetch-fashion-mnist", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
copy_imagefolder = task(dl.copy_imagefolder, name="copy-imagefolder", cache_policy=NO_CACHE)


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
            rows = [row for f in futures for row in f.result()]
        elif isinstance(spec, FashionMnistSource):
            rows = fetch_fashion_mnist(spec.uri, root, spec.per_class)
        elif isinstance(spec, ImageFolderSource):
            rows = copy_imagefolder(Path(spec.path), root)
        else:  # pragma: no cover - params validation rejects other kinds
            raise TypeError(type(spec))
        table = dl.write_catalog(rows, root, source)
    labels = len(set(table.column("label").to_pylist()))
    log.info("download[%s]: %d images in %d classes -> %s", source, table.num_rows, labels, RAW_DIR / source)
    return table.num_rows


if __name__ == "__main__":
    def run(params, key):
        dl.check_source(key, params.sources[key])
        download(key, params.sources[key])

    main(run, keys=lambda p: p.sources)
