"""Command line for the exported embedder (no pipeline, no Prefect server needed).

    python -m flows.embed index photos/ --out photos.parquet     # embed a folder
    python -m flows.embed search query.jpg --index photos.parquet -k 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.embed import embed_folder, search, write_index
from tasks.export import load_exported
from tasks.schemas.paths import EXPORT_DIR

DEFAULT_MODEL = EXPORT_DIR / "embedder.pt2"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.embed",
        description="Embed and search images with the exported 64-d embedder.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"exported embedder (default: {DEFAULT_MODEL})")
    sub = parser.add_subparsers(dest="command", required=True)
    idx = sub.add_parser("index",
                         help="embed every image under a folder into Parquet (path, embedding)")
    idx.add_argument("folder", type=Path)
    idx.add_argument("--out", type=Path, required=True)
    find = sub.add_parser("search", help="top-k neighbours of a query image in an index")
    find.add_argument("image", type=Path)
    find.add_argument("--index", type=Path, required=True)
    find.add_argument("-k", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"error: {args.model}: no exported embedder; run `dvc repro export` first",
              file=sys.stderr)
        return 2
    model = load_exported(args.model)
    if args.command == "index":
        if not args.folder.is_dir():
            print(f"error: {args.folder}: no such folder", file=sys.stderr)
            return 2
        paths, emb, skipped = embed_folder(model, args.folder)
        write_index(args.out, paths, emb)
        for path, reason in skipped:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        print(f"{len(paths)} images embedded into {args.out} ({len(skipped)} skipped)")
    else:
        for rank, (path, dist) in enumerate(search(model, args.index, args.image, args.k), start=1):
            print(f"{rank}\t{dist:.4f}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
