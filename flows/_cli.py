"""The shared entry point of every `python -m flows.<stage>` command.

It loads and validates all of params.yaml before any work, picks the
foreach key (variant or source) from argv, and turns a params error into one
clear line and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterable

from tasks.params import Params, ParamsError, load_params


def main(run: Callable[[Params, str | None], Any], keys: Callable[[Params], Iterable[str]] | None = None) -> None:
    """Run one stage: `run(params, key)`, where key is argv[1] for foreach stages."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params()
        key = None
        if keys is not None:
            allowed = sorted(keys(params))
            if len(sys.argv) != 2 or sys.argv[1] not in allowed:
                given = sys.argv[1] if len(sys.argv) > 1 else None
                raise ParamsError(f"stage key {given!r}: allowed are {allowed}")
            key = sys.argv[1]
        run(params, key)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
