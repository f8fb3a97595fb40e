"""What Prefect costs each DVC stage: a temporary server per process vs one shared local server.

Each stage is a fresh `python -m flows.<stage>` process. This times, in one
run and on the same machine, a child process that runs an empty flow
  - with no server configured (Prefect starts a temporary one per process),
  - against one shared `prefect server start` on 127.0.0.1 (what flows.pipeline
    and `make demo` give the stages),
  - and the same process importing Prefect without running a flow (the floor),
and prints JSON. Run on demand: `python benchmarks/orchestration.py [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CHILD_FLOW = "from prefect import flow\n@flow(name='noop')\ndef noop():\n    return 1\nnoop()\n"
CHILD_IMPORT = "import prefect.flows\n"


def timed(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "prefect", "server", "start",
               "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("prefect server did not start in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        timed(CHILD_FLOW, env)  # first run migrates the database: not what a stage pays later
        temporary = [timed(CHILD_FLOW, env) for _ in range(args.repeats)]
        floor = [timed(CHILD_IMPORT, env) for _ in range(args.repeats)]
        server, url = start_server(env)
        try:
            shared_env = {**env, "PREFECT_API_URL": url}
            timed(CHILD_FLOW, shared_env)  # warm the server's caches
            shared = [timed(CHILD_FLOW, shared_env) for _ in range(args.repeats)]
        finally:
            server.terminate()
            server.wait(timeout=30)
    t, s, f = (statistics.median(x) for x in (temporary, shared, floor))
    print(json.dumps({
        "repeats": args.repeats,
        "stage_with_temporary_server_s": round(t, 2),
        "stage_with_shared_server_s": round(s, 2),
        "python_and_prefect_import_s": round(f, 2),
        "overhead_temporary_server_s": round(t - f, 2),
        "overhead_shared_server_s": round(s - f, 2),
        "temporary_over_shared": round(t / s, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
