"""Content-addressed cache of per-image embeddings, shared by every extract run.

DVC reruns `extract@<variant>` whenever its shards change, and deletes the
stage's old outputs first. Without this cache, raising `sample.samples` from
55 to 60 would embed all 60 images per class again, and a run killed after
nine hours would start from zero. With it, an image is embedded once per
(image bytes, checkpoint, model config, code, libraries, numerics): the stage's outputs are
still rebuilt in full, so `dvc.lock` stays truthful, but from cached rows.

Layout: `<root>/<namespace>/<chunk>.arrow`, where the namespace hashes
everything besides the image that decides the embedding, and each chunk is an
Arrow IPC file (`digest`: sha256 of the JPEG bytes, `embedding`) written
atomically. Chunks are only ever added, so several processes or Dask workers
can fill one cache at once without locking.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import logging
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from tasks.schemas.features import embedding_array, embeddings_of, write_ipc
from tasks.schemas.io import sha256_file, write_json

log = logging.getLogger(__name__)

# Bump when the meaning of a cached row changes in a way the key cannot see.
CACHE_FORMAT = 1
# A temp chunk older than this was left by a killed process, not one still writing.
STALE_TEMP_S = 3600.0


def image_digest(data: bytes) -> bytes:
    """The content address of one image: sha256 of its encoded bytes."""
    return hashlib.sha256(data).digest()


# What decides an embedding besides the weights and configs: the code that decodes, preprocesses,
# loads and runs the model. Their meaning is fingerprinted, not their bytes (see code_fingerprint).
EMBEDDING_CODE = ("tasks.preprocess", "tasks.extract:_Decoded", "tasks.decode:_decode",
                  "tasks.extract:Embedder",
                  "tasks.backbone:load_backbone")
# Libraries whose numerics or defaults can change an embedding between releases.
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "timm", "pillow")


def code_fingerprint(source: str) -> str:
    """sha256 of the code's syntax tree without docstrings: a comment, a docstring or a
    reformatted line keeps it; any change to what the code does gives another."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        documented = (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                        ast.AsyncFunctionDef))
                      and body and isinstance(body[0], ast.Expr)
                      and isinstance(body[0].value, ast.Constant)
                      and isinstance(body[0].value.value, str))
        if documented:
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def embedding_code_version(names: Sequence[str] | None = None) -> str:
    """One fingerprint over the modules and objects that turn image bytes into an embedding
    (`module` or `module:object` names; EMBEDDING_CODE by default)."""
    parts = []
    for name in EMBEDDING_CODE if names is None else names:
        module_name, _, attr = name.partition(":")
        obj = importlib.import_module(module_name)
        if attr:
            obj = getattr(obj, attr)
        parts.append(f"{name}={code_fingerprint(inspect.getsource(obj))}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """The installed releases of LIBRARIES."""
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def cache_key(model_dir: Path | str, device_type: str, precision: str, *, batch_size: int,
              cpu_threads: int) -> dict[str, Any]:
    """Everything besides the image that decides its embedding.

    The checkpoint's bytes, the variant's full open_clip config (architecture,
    activation, preprocessing), the meaning of the embedding code, the library
    versions, and the numerics: CPU fp32 or the GPU model and CUDA fp16/bf16
    autocast, and the batch shape and CPU threads, by which torch picks kernels.
    """
    model_dir = Path(model_dir)
    numerics = f"cpu-fp32, batches of {batch_size}, {cpu_threads} threads"
    if device_type == "cuda":  # kernels (and so the last bits) differ between GPU generations
        import torch

        gpu = "none visible"
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            gpu = f"{torch.cuda.get_device_name()} sm{major}{minor}"
        numerics = f"cuda-{precision} ({gpu}), batches of {batch_size}"
    return {
        "format": CACHE_FORMAT,
        "checkpoint_sha256": sha256_file(model_dir / "open_clip_model.safetensors"),
        "open_clip_config": json.loads((model_dir / "open_clip_config.json").read_text()),
        "code": embedding_code_version(),
        "libraries": library_versions(),
        "numerics": numerics,
    }


def namespace_of(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class EmbeddingCache:
    """Digest -> embedding lookups over the chunk files of one namespace.

    The digest column of every chunk is indexed once when the cache opens
    (32 bytes a row); embeddings stay in the memory-mapped files until asked
    for. Thread-safe: one instance serves all shards mapped in a process.
    """

    def __init__(self, root: Path | str, key: dict[str, Any], dim: int):
        self.dir = Path(root) / namespace_of(key)
        self.dim = dim
        embedding = pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)
        self._schema = pa.schema([pa.field("digest", pa.binary(32), nullable=False), embedding],
                                 metadata={"cache_key": json.dumps(key, sort_keys=True)})
        self._lock = threading.Lock()
        self._where: dict[bytes, tuple[int, int]] = {}
        self._tables: list[pa.Table] = []
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "key.json").exists():
            write_json(self.dir / "key.json", key)  # what the namespace means, for people
        for path in sorted(self.dir.glob("*.arrow")):
            if not path.name.startswith("."):  # "." = a temp file of a write in progress
                self._open(path)
            elif self._stale(path):
                path.unlink(missing_ok=True)  # left by a killed writer; a live one would be younger

    @staticmethod
    def _stale(temp: Path) -> bool:
        """Whether a temp chunk is old enough to be a killed writer's; one that another
        process renamed into place (or removed) since the directory was listed is not."""
        try:
            return time.time() - temp.stat().st_mtime > STALE_TEMP_S
        except FileNotFoundError:
            return False

    def __len__(self) -> int:
        return len(self._where)

    def _open(self, path: Path) -> None:
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
            if table.schema.field("embedding").type.list_size != self.dim:
                stored = table.schema.field("embedding").type.list_size
                raise ValueError(f"embedding dim {stored} != {self.dim}")
        except (pa.ArrowInvalid, KeyError, ValueError) as exc:
            log.warning("embedding cache: skipping unreadable chunk %s (%s)", path, exc)
            return
        slot = len(self._tables)
        self._tables.append(table)
        for row, digest in enumerate(table.column("digest").to_pylist()):
            self._where.setdefault(digest, (slot, row))

    def get(self, digests: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, embeddings) for `digests`; rows of misses are zeros."""
        out = np.zeros((len(digests), self.dim), np.float32)
        hit = np.zeros(len(digests), bool)
        by_table: dict[int, list[tuple[int, int]]] = {}
        with self._lock:
            for i, d in enumerate(digests):
                if (loc := self._where.get(d)) is not None:
                    by_table.setdefault(loc[0], []).append((i, loc[1]))
            tables = list(self._tables)
        for slot, pairs in by_table.items():
            idx = np.array([i for i, _ in pairs])
            out[idx] = embeddings_of(tables[slot].take(pa.array([r for _, r in pairs])))
            hit[idx] = True
        return hit, out

    def put(self, digests: Sequence[bytes], embeddings: np.ndarray) -> None:
        """Add rows as one new chunk file (atomic: a kill leaves no half chunk)."""
        if not len(digests):
            return
        table = pa.Table.from_arrays(
            [pa.array(list(digests), type=pa.binary(32)),
             embedding_array(np.asarray(embeddings, dtype=np.float32)
                             .reshape(len(digests), self.dim))],
            schema=self._schema)
        target = self.dir / f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.arrow"
        write_ipc(target, table)
        with self._lock:
            self._open(target)
