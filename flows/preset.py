"""`python -m flows.preset <name>`: switch params.yaml to a named recipe (see presets/).

The result is validated before params.yaml is replaced (atomically), so a
preset that would not run leaves the file as it was. Then `dvc repro` (or
`dvc exp run`, to keep it as an experiment) runs what the change affects.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from tasks.params.base import PARAMS_FILE, ParamsError, load_yaml
from tasks.presets import list_presets, preset_params
from tasks.schemas.io import write_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.preset",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", help=f"one of {list_presets()}")
    parser.add_argument("--check", action="store_true",
                        help="validate only; leave params.yaml alone")
    args = parser.parse_args(argv)
    if not args.name:
        print("presets:", " ".join(list_presets()))
        return 0
    try:
        base = load_yaml(PARAMS_FILE)
        merged = preset_params(args.name, base)
    except (ParamsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    changed = sorted(k for k in merged if merged[k] != base.get(k))
    if not args.check:
        header = (f"# Preset `{args.name}` applied by `python -m flows.preset {args.name}` "
                  f"(see presets/{args.name}.yaml).\n")
        body = yaml.safe_dump(merged, sort_keys=False, allow_unicode=True)
        write_bytes(PARAMS_FILE, (header + body).encode())
    verdict = "valid" if args.check else "applied"
    print(f"preset {args.name}: {verdict}; sections changed: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
