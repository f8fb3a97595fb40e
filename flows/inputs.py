"""Stage `inputs`: a fingerprint of what each `download` and `models` stage reads from outside.

DVC runs it every time (`always_changed`) and it costs little: unchanged files keep their
remembered sha256. `download@<source>` depends on data/00_inputs/sources/<source>.json and
`models@<variant>` on data/00_inputs/models/<variant>.json, so adding an image to a folder,
replacing a checkpoint or upgrading a package that ships photos reruns exactly those stages.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows._cli import main
from tasks.inputs import HashState, model_fingerprint, source_fingerprint
from tasks.params.models import ModelParams
from tasks.params.project import load_params
from tasks.params.sources import SourceParams
from tasks.schemas.io import write_json
from tasks.schemas.paths import INPUTS_DIR


@flow(name="inputs")
def inputs(sources: dict[str, SourceParams], models: dict[str, ModelParams]) -> dict:
    """Write one fingerprint per source and per model variant; return them."""
    log = get_run_logger()
    state = HashState()
    written: dict[str, dict] = {}
    try:
        for name, spec in sorted(sources.items()):
            written[f"sources/{name}"] = source_fingerprint(name, spec, state)
        for name, spec in sorted(models.items()):
            written[f"models/{name}"] = model_fingerprint(name, spec, state)
    finally:
        state.close()
    for key, fingerprint in written.items():
        write_json(INPUTS_DIR / f"{key}.json", fingerprint)
        if fingerprint.get("tracked") is False:
            log.warning("inputs[%s]: %s", key, fingerprint["note"])
    log.info("inputs: %d fingerprints in %s", len(written), INPUTS_DIR)
    return written


if __name__ == "__main__":
    def run(_sections: object, _key: None) -> None:
        params = load_params()  # the whole file: a bad value anywhere stops the run here, first
        inputs(dict(params.sources), dict(params.models))

    main(run, {})
