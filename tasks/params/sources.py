"""`sources`: the datasets, one `download@<source>` stage each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from tasks.params.base import HOUR, GiB, MiB, _Section


class PackagePhotosSource(_Section):
    """Real photographs shipped by installed packages, one object class per photo."""

    kind: Literal["package_photos"]
    # Enough distinct views that `sample.samples` can grow without running out.
    views: int = Field(24, ge=1, le=1000)
    # Views are downscaled so the longer side is at most this; keeps the demo fast.
    max_side: int = Field(256, ge=32, le=4096)
    seed: int = 0
    # How far two thumbnails may differ (mean abs difference of 16x16 grey
    # thumbnails, 0-255) and still count as the same object photographed twice.
    duplicate_threshold: float = Field(12.0, ge=0.0, le=255.0)
    # File-name globs to leave out: synthetic images, logos, calibration shots.
    exclude: list[str] = Field(default_factory=list)


class FashionMnistSource(_Section):
    """Fashion-MNIST in its published IDX layout, at a folder path, file:// or http(s):// URL."""

    kind: Literal["fashion_mnist"]
    uri: str
    # Images written per class; sampling later picks `sample.samples` of them.
    per_class: int = Field(200, ge=1, le=6000)
    # sha256 of each file, for a copy that is neither the published one nor Debian's
    # (both are known to tasks/fashion_mnist.py and checked when this is empty).
    sha256: dict[Literal["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"],
                 Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]] = Field(default_factory=dict)
    # The published training images are 26 MB; 64 MiB leaves room and stops a runaway server.
    max_download_bytes: int = Field(64 * MiB, ge=1)
    # Seconds per file on its requests (all retries together): stops a server that trickles.
    max_download_seconds: float = Field(6 * HOUR, gt=0.0)
    download_cache: str = ".cache/downloads"


class ImageFolderSource(_Section):
    """Anyone's own data: one sub-folder per class under `path`."""

    kind: Literal["imagefolder"]
    path: Path


class Fetch(_Section):
    """One file to fetch: a URL (http(s)://, file://) or a local path, with its sha256 if known."""

    url: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    # Sub-folder of the source's folder to put the file in (or extract the archive into):
    # GLDv2's images_NNN.tar hold a/b/c/<id>.jpg, which belong under train/.
    into: str = ""

    @model_validator(mode="after")
    def _into_is_relative(self) -> "Fetch":
        if self.into.startswith("/") or ".." in Path(self.into).parts:
            raise ValueError(f"into = {self.into!r}: must be a relative folder inside the source")
        return self


class DatasetSource(_Section):
    """A dataset in its published layout, fetched from `uri`.

    `uri` is a folder, a file or archive (tar, tar.gz, zip; local, file:// or
    http(s)://), a list of them (GLDv2 comes as train.csv + 500 tars), or a
    Kaggle competition or dataset: kaggle://competitions/<name>,
    kaggle://datasets/<owner>/<name>. Archives are extracted safely into the
    source's folder; downloads are kept in `download_cache` so a rerun or a
    dropped connection does not fetch again what it already has.
    """

    uri: Union[str, list[Union[str, Fetch]]]
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")  # of `uri`, when it is one file
    download_cache: str = ".cache/downloads"
    # Bytes per downloaded file, so a wrong URL or a hostile server cannot fill the disk. The
    # largest published files of these kinds (Products-10K's and RP2K's zips, DeepFashion's
    # img.zip, GLDv2's 500 MB tars) are well under 64 GiB; ImageNet and GLR2021 raise it.
    max_download_bytes: int = Field(64 * GiB, ge=1)
    # Seconds per file on its requests (all retries together), so a server that trickles a byte
    # at a time, each within the read timeout, cannot hold the stage for ever; 6 h fetch 100 GiB
    # at 5 MB/s (Kaggle's own client is not bounded by it).
    max_download_seconds: float = Field(6 * HOUR, gt=0.0)
    # Limits per archive extracted (tasks/archives.py), so a bomb stops before it fills the disk.
    # Entries: Kaggle's ImageNet zip, the largest a preset reads, lists about 2.0M (1.28M train,
    # 150k val/test images, 0.6M box XMLs), GLR2021's about 1.6M, a GLDv2 tar about 8,000.
    archive_max_entries: int = Field(5_000_000, ge=1)
    # Bytes written: ImageNet's zip expands to about 160 GB, GLR2021's to about 105 GB.
    archive_max_bytes: int = Field(256 * GiB, ge=1)
    # Bytes written per byte of archive: images expand about 1:1 and text 3-10:1, while
    # zeros deflate 1000:1 (bzip2, xz far more). Checked on bytes written, past 1 MiB.
    archive_max_ratio: float = Field(200.0, ge=1.0)

    @model_validator(mode="after")
    def _sha_only_for_one_file(self) -> "DatasetSource":
        if self.sha256 and not isinstance(self.uri, str):
            raise ValueError("sha256 is for a single uri; "
                             "for a list give each entry as {url: ..., sha256: ...}")
        return self

    def fetches(self) -> list[Fetch]:
        items = [self.uri] if isinstance(self.uri, str) else self.uri
        out = [Fetch(url=i) if isinstance(i, str) else i for i in items]
        if self.sha256:
            out = [Fetch(url=out[0].url, sha256=self.sha256)]
        return out


class ImageNetSource(DatasetSource):
    """Kaggle's ImageNet Object Localization Challenge: ILSVRC/Data/CLS-LOC/train/<wnid>/*.JPEG."""

    kind: Literal["imagenet"]
    # Kaggle's imagenet-object-localization-challenge.zip is about 155 GiB.
    max_download_bytes: int = Field(256 * GiB, ge=1)


class Products10kSource(DatasetSource):
    """Products-10K: train.csv (name, class, group) and the train/ image folder."""

    kind: Literal["products10k"]


class LandmarksSource(DatasetSource):
    """Google Landmarks v2 / GLR2021: train.csv (id, landmark_id), train/<a>/<b>/<c>/<id>.jpg."""

    kind: Literal["landmarks"]
    # Kaggle's landmark-recognition-2021 zip is about 100 GiB (GLDv2's own tars are 500 MB each).
    max_download_bytes: int = Field(256 * GiB, ge=1)


class Rp2kSource(DatasetSource):
    """RP2K retail products: train/<class name>/*.jpg, class names in Chinese (UTF-8)."""

    kind: Literal["rp2k"]


class DeepFashionC2sSource(DatasetSource):
    """DeepFashion Consumer-to-shop: Eval/list_eval_partition.txt, img/...; a class per item_id."""

    kind: Literal["deepfashion_c2s"]
    # Which pairs of the partition to read (its evaluation_status column). Training
    # recipes (mdfe's M4D-35k) use the train pairs only, so val/test stay unseen.
    statuses: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["train"], min_length=1)


class StanfordCarsSource(DatasetSource):
    """Stanford Cars: devkit .mat files + cars_train/ (or Kaggle's nested copy); labels: names."""

    kind: Literal["stanford_cars"]


class CsvSource(DatasetSource):
    """Anyone's own data as a table: `table` (CSV or Parquet, in the dataset) lists path, label."""

    kind: Literal["csv"]
    table: str = "labels.csv"
    path_column: str = "path"   # relative to the table's folder
    label_column: str = "label"


class UrlsSource(_Section):
    """A CSV or Parquet list of image URLs with labels, downloaded concurrently.

    Retries with exponential backoff on timeouts, 429 (honouring
    Retry-After) and 5xx; every failure is recorded in failures.parquet; a
    rerun fetches only what is missing or failed (fetched images are kept in
    `download_cache`).
    """

    kind: Literal["urls"]
    uri: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    url_column: str = "url"
    label_column: str = "label"
    concurrency: int = Field(32, ge=1, le=512)  # connections in all
    per_host: int = Field(8, ge=1, le=512)      # connections to any one host
    retries: int = Field(4, ge=0, le=20)
    timeout_s: float = Field(30.0, gt=0.0)
    backoff_s: float = Field(1.0, ge=0.0)       # first retry's wait; doubles each time
    download_cache: str = ".cache/downloads"
    # Bytes per image: camera JPEGs are 2-20 MB and the shard stage downscales to 512 px anyway;
    # more is a mislabelled video or archive, or a server that never stops.
    max_image_bytes: int = Field(50 * MiB, ge=1)
    # Bytes of the list itself: GLDv2's train.csv with URLs (4.1M rows) is about 500 MB.
    max_list_bytes: int = Field(4 * GiB, ge=1)
    # Rows of the list: GLDv2's 4.1M fit; a Parquet file stores millions of equal rows in
    # kilobytes, so bytes alone do not bound what reading it costs (counted before decoding).
    max_list_rows: int = Field(10_000_000, ge=1)
    # Seconds per image, and for the list, on their requests (all retries together): a 50 MiB
    # image at 100 KB/s takes 9 min; a server that trickles bytes to hold a connection is cut off.
    max_image_seconds: float = Field(600.0, gt=0.0)
    max_list_seconds: float = Field(6 * HOUR, gt=0.0)
    # A third party's list may name hosts inside your network (127.0.0.1, 10.x, 169.254.169.254
    # cloud metadata): refused, on every redirect hop too, unless this is true.
    allow_private_addresses: bool = False


SourceParams = Annotated[
    Union[PackagePhotosSource, FashionMnistSource, ImageFolderSource, ImageNetSource,
          Products10kSource, LandmarksSource, Rp2kSource, DeepFashionC2sSource,
          StanfordCarsSource, CsvSource, UrlsSource],
    Field(discriminator="kind"),
]
