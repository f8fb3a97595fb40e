"""What every params section shares: strict pydantic models, readable errors, loading.

A stage validates only the sections it reads (`load_sections`), so editing one stage's
params class makes only that stage stale; the `inputs` stage, first in every run,
validates the whole file (tasks/params/project.py), so a bad value anywhere still stops
`dvc repro` before any work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

PARAMS_FILE = Path("params.yaml")
MiB, GiB = 1 << 20, 1 << 30
HOUR = 3600.0


class ParamsError(ValueError):
    """A params.yaml value is invalid; the message names key, value and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are typos far more often than intent: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _describe(error: dict[str, Any]) -> str:
    """Turn one pydantic error into 'key = value: what is allowed'."""
    parts = [str(p) for p in error["loc"]
             if not str(p).startswith(("function-after", "tagged-union"))]
    if parts[:1] in (["models"], ["sources"]) and len(parts) >= 3:
        # pydantic puts the union tag (the `kind`) into the path; the user never wrote it
        del parts[2]
    loc = ".".join(parts)
    msg = error["msg"].removeprefix("Value error, ")
    ctx = error.get("ctx", {})
    bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}",
              "less_than_equal": "<= {le}", "less_than": "< {lt}"}
    if error["type"] in bounds:
        msg = "allowed is a value " + bounds[error["type"]].format(**ctx)
    elif error["type"] == "literal_error":
        msg = f"allowed are {ctx.get('expected')}"
    elif error["type"] == "extra_forbidden":
        msg = "unknown key (a typo?)"
    if error["type"] == "union_tag_invalid":
        kind = error["input"].get("kind")
        return f"{loc}.kind = {kind!r}: unknown kind; allowed are {ctx.get('expected_tags')}"
    if error["type"] == "missing":
        return f"{loc} is missing: it is required"
    if error["type"] == "value_error" and not loc:
        return msg
    value = error.get("input")
    return f"{loc} = {value!r}: {msg}" if loc else msg


# A section of which a stage reads only the names (the variant list of train or evaluate):
# its values are validated by the stages that read them, not here.
NAMES = dict[str, Any]


def load_yaml(path: Path) -> Any:
    """A YAML file as plain values (no tags, no objects), read as YAML 1.2: the version DVC
    reads and writes params.yaml in. `dvc exp run -S` rewrites the file, leaving `off`
    and `pic?.png` unquoted in it, which a YAML 1.1 reader (PyYAML) takes for false or
    refuses; both read as written here."""
    try:
        return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None


def read_raw(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a mapping of sections, read safely."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root")
    raw = load_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of stage sections")
    return raw


def validate(model: type[BaseModel], raw: dict[str, Any], origin: str) -> Any:
    """`model` validated from `raw`, or ParamsError with one readable line per problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ParamsError(f"{origin}: invalid params:\n  " + "\n  ".join(lines)) from None


def load_sections(sections: dict[str, Any], path: Path | str = PARAMS_FILE) -> Any:
    """The named sections of params.yaml, each validated as its type; other sections unread.

    A section whose type has defaults for every field may be absent. Returns an object with
    one attribute per section, as the whole-file `Params` has.
    """
    fields = {}
    for name, kind in sections.items():
        try:
            fields[name] = (kind, kind())
        except (TypeError, ValidationError):
            fields[name] = (kind, ...)
    model = create_model("Sections", __base__=_Section, **fields)
    raw = read_raw(path)
    return validate(model, {k: v for k, v in raw.items() if k in sections}, str(path))
