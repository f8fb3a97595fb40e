"""Check backbones against open_clip itself (see tasks/parity.py); prints one JSON line each.

    python -m flows.parity ViT-L-14/openai ViT-SO400M-14-SigLIP-384/webli   # config + preprocessing
    python -m flows.parity --outputs ViT-B-32/openai                         # + weights, end to end

With `--outputs` the weights are read as the `models` stage reads them (the
Hugging Face cache, or a download); with real weights this is the check to
run on a machine that has them. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tasks.parity import check_outputs, check_structure, sample_photos
from tasks.preprocess import decode_rgb

# Largest differences that still pass: tensors through the same modules are equal to float
# rounding; our uint8 preprocessing is within a few grey levels of PIL's (README: parity).
MAX_PREPROCESS_LEVELS = 8.0
MIN_PHOTO_COSINE = 0.999
MAX_RELATIVE_DIFF = 1e-5


def passed(result: dict) -> bool:
    ok = result["preprocess_cfg_equal"] and result["preprocess_max_levels"] <= MAX_PREPROCESS_LEVELS
    ok = ok and result["export_preprocess_max_levels"] <= MAX_PREPROCESS_LEVELS
    if "modules_equal" in result:
        ok = ok and result["modules_equal"] and result["shapes_equal"]
    if "same_input_max_abs_diff" in result:
        ok = (
            ok
            and result["same_input_max_abs_diff"]
            <= MAX_RELATIVE_DIFF * result["same_input_max_abs"]
        )
        ok = ok and result["photo_min_cosine"] >= MIN_PHOTO_COSINE
    return bool(ok)


def _photos(folder: Path | None) -> list[bytes]:
    if folder is None:
        return sample_photos()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    photos = [p.read_bytes() for p in files]
    for data in photos:
        decode_rgb(data)  # a file that is not an image fails here, with its decoder's message
    return photos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.parity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("models", nargs="+", metavar="ARCH/TAG", help="e.g. ViT-L-14/openai")
    parser.add_argument(
        "--outputs", action="store_true", help="also compare outputs with the weights"
    )
    parser.add_argument("--photos", type=Path, help="a folder of photos (default: scikit-image's)")
    parser.add_argument("--device", default="cpu", help="where --outputs runs both models (fp32)")
    parser.add_argument(
        "--path",
        type=Path,
        help="with --outputs and one ARCH/TAG: a local weights "
        "file for that tag, as models.<variant>.path takes it",
    )
    args = parser.parse_args(argv)
    if args.path and (not args.outputs or len(args.models) != 1):
        parser.error("--path goes with --outputs and one ARCH/TAG")
    photos = _photos(args.photos)
    failed = 0
    for spec in args.models:
        arch, _, tag = spec.partition("/")
        if args.outputs:
            with tempfile.TemporaryDirectory() as tmp:
                result = check_outputs(
                    arch, tag, photos, Path(tmp), path=args.path, device=args.device
                )
        else:
            result = check_structure(arch, tag, photos)
        result["passed"] = passed(result)
        failed += not result["passed"]
        print(json.dumps(result, sort_keys=True), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
