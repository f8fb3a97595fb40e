"""The shared entry point of every `python -m flows.<stage>` command.

It loads and validates the params.yaml sections the stage reads, and only those (the
`inputs` stage, first in every run, validates the whole file), picks the foreach key
(variant or source) from argv, and turns a params error into one clear line and exit
status 2 instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from tasks.params.base import ParamsError, load_sections


def main(run: Callable[[Any, str | None], Any], sections: dict[str, Any],
         keys: str | None = None) -> None:
    """Run one stage: `run(params, key)`; key is argv[1] for foreach stages over section `keys`.

    `params` has one attribute per entry of `sections` (name -> its type).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_sections(sections)
        key = None
        if keys is not None:
            allowed = sorted(getattr(params, keys))
            if len(sys.argv) != 2 or sys.argv[1] not in allowed:
                given = sys.argv[1] if len(sys.argv) > 1 else None
                raise ParamsError(f"stage key {given!r}: allowed are {allowed}")
            key = sys.argv[1]
        run(params, key)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
