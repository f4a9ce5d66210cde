"""Apache Airflow 3 on this machine for the project's DAGs (dags/): the API server (UI and REST
API), the scheduler (LocalExecutor) and the DAG processor, on 127.0.0.1 with AIRFLOW_HOME in
.airflow/ (ignored by git), SQLite metadata, the simple auth manager with one user, DAGs unpaused
at creation. `make airflow` / `make airflow-stop`; the tests use the same code.

  python orchestration/airflow_stack.py start [--port 18080]   (RAREML_AIRFLOW_PASSWORD: the login's)
  python orchestration/airflow_stack.py stop
  python orchestration/airflow_stack.py status   (exit 1 unless both DAGs are parsed, unpaused, error-free)
  python orchestration/airflow_stack.py run --host 0.0.0.0 --port 8080   (a container: in the foreground)

Needs Airflow in the venv: `make airflow-setup` (requirements-airflow.txt).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python orchestration/airflow_stack.py`: the project beside it
    sys.path.insert(0, str(ROOT))
from rareml.orchestrator import Airflow, OrchestratorUnavailable
from rareml.processes import gone, stop_group, wait_http

HOME = ROOT / ".airflow"
PORT = 18080  # not Airflow's 8080
USER = "admin"
DAGS = ("rareml_train", "rareml_retrain")
PROCESSES = ("api-server", "scheduler", "dag-processor")


@dataclass(frozen=True)
class Running:
    url: str
    username: str
    password: str
    pids: dict[str, int]

    def client(self) -> Airflow:
        return Airflow(self.url, self.username, self.password, timeout=5.0)


def airflow_binary() -> str:
    path = Path(sys.executable).parent / "airflow"
    if not path.exists():
        raise SystemExit("error: Airflow is not installed in this venv: run `make airflow-setup`")
    return str(path)


def _secret(home: Path, name: str, value: str | None = None) -> str:
    """A secret kept in a private file of AIRFLOW_HOME (made once; `value` replaces it)."""
    path = home / name
    if value is None and path.exists():
        return path.read_text().strip()
    value = value or secrets.token_urlsafe(24)
    path.touch(mode=0o600)
    path.write_text(value)
    return value


def environment(home: Path = HOME, port: int = PORT, password: str | None = None,
                host: str = "127.0.0.1") -> dict[str, str]:
    """What every Airflow process (and dag.test() in the tests) is started with."""
    home.mkdir(parents=True, exist_ok=True)
    password = _secret(home, "admin_password", password or os.environ.get("RAREML_AIRFLOW_PASSWORD"))
    passwords = home / "passwords.json"
    passwords.touch(mode=0o600)
    passwords.write_text(json.dumps({USER: password}))
    return dict(os.environ) | {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",  # two cores
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(home, "jwt_secret"),  # the same in every process
        "AIRFLOW__API__SECRET_KEY": _secret(home, "secret_key"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "20",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "NO_COLOR": "1",
    }


def dags(client: Airflow) -> dict[str, bool]:
    """The DAGs Airflow has parsed: {dag_id: is_paused}."""
    return {d["dag_id"]: d["is_paused"] for d in client.get("/api/v2/dags?limit=100")["dags"]}


def wait_dags(client: Airflow, seconds: float = 180) -> dict:
    """Until the DAG processor has parsed both DAGs: {dag_id: is_paused}."""
    deadline, seen = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        try:
            seen = dags(client)
        except OrchestratorUnavailable:
            pass
        if all(d in seen for d in DAGS):
            return seen
        time.sleep(1)
    raise RuntimeError(f"the DAGs {', '.join(DAGS)} were not parsed within {seconds:g} s (seen: {sorted(seen)}); "
                       f"see {HOME}/dag-processor.log")


def spawn(name: str, command: list[str], env: dict, home: Path) -> subprocess.Popen:
    log = home / f"{name}.log"
    proc = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
                            cwd=ROOT, start_new_session=True)
    (home / f"{name}.pid").write_text(str(proc.pid))
    return proc


def start(home: Path = HOME, port: int = PORT, password: str | None = None, seconds: float = 240,
          host: str = "127.0.0.1") -> Running:
    """Migrate the metadata database, start the three processes, wait until the API answers and
    both DAGs are parsed."""
    stop(home)
    env = environment(home, port, password, host)
    binary = airflow_binary()
    migrate = subprocess.run([binary, "db", "migrate"], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=600, check=False)
    if migrate.returncode:
        raise RuntimeError(f"airflow db migrate failed:\n{migrate.stdout[-1500:]}{migrate.stderr[-1500:]}")
    procs = {"api-server": spawn("api-server", [binary, "api-server", "--host", host, "--port", str(port),
                                                "--workers", "1"], env, home),
             "scheduler": spawn("scheduler", [binary, "scheduler"], env, home),
             "dag-processor": spawn("dag-processor", [binary, "dag-processor"], env, home)}
    running = Running(f"http://127.0.0.1:{port}", USER, _secret(home, "admin_password"),
                      {name: p.pid for name, p in procs.items()})
    try:
        wait_http(f"{running.url}/api/v2/monitor/health", procs["api-server"], seconds=seconds,
                  log=home / "api-server.log")
        wait_dags(running.client(), seconds=seconds)
    except (RuntimeError, OrchestratorUnavailable) as exc:
        stop(home)
        raise RuntimeError(str(exc)) from None
    return running


def stop(home: Path = HOME) -> list[str]:
    """Stop what `start` started, by the PIDs it wrote; returns which were running."""
    stopped = []
    for name in PROCESSES:
        pid_file = home / f"{name}.pid"
        if not pid_file.exists():
            continue
        stop_group(int(pid_file.read_text()), seconds=20)
        pid_file.unlink()
        stopped.append(name)
    return stopped


def status(url: str, home: Path = HOME) -> int:
    """Print the DAGs (paused or not) and import errors; 0 if both DAGs are there, unpaused, error-free."""
    client = Airflow(url, USER, _secret(home, "admin_password"), timeout=5.0)
    try:
        parsed, errors = dags(client), client.get("/api/v2/importErrors")["import_errors"]
    except OrchestratorUnavailable as exc:
        print(f"error: {exc}: make airflow")
        return 1
    for dag_id in DAGS:
        print(f"{dag_id}: {'missing' if dag_id not in parsed else 'paused' if parsed[dag_id] else 'unpaused'}")
    for error in errors:
        print(f"import error in {error.get('filename')}: {error.get('stack_trace', '')[-500:]}")
    return 0 if all(parsed.get(d) is False for d in DAGS) and not errors else 1


def foreground(airflow: Running, home: Path = HOME) -> None:
    """Wait while all three run; on SIGTERM or when one exits, stop them all."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        while not any(gone(pid) for pid in airflow.pids.values()):
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    finally:
        stop(home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "run", "status"), help="run: start, then stay in the "
                        "foreground until one of the processes exits or SIGTERM comes (a container's command)")
    parser.add_argument("--port", type=int, default=PORT, help="the API server's (UI and REST API) port")
    parser.add_argument("--host", default="127.0.0.1", help="the API server's address (0.0.0.0 in a container)")
    args = parser.parse_args()
    if args.action == "stop":
        stopped = stop()
        print(f"Airflow stopped ({', '.join(stopped)})" if stopped else "Airflow was not running")
        return
    if args.action == "status":
        sys.exit(status(f"http://127.0.0.1:{args.port}"))
    try:
        airflow = start(port=args.port, host=args.host)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    if args.action == "run":
        print(f"Airflow on {args.host}:{args.port}, DAGs {', '.join(DAGS)}; login {airflow.username}", flush=True)
        foreground(airflow)
        return
    print(f"Airflow UI:   {airflow.url} (login {airflow.username} / {airflow.password})\n"
          f"DAGs:         {', '.join(DAGS)} (unpaused)\n"
          f"the API:      RAREML_AIRFLOW_URL={airflow.url} RAREML_AIRFLOW_PASSWORD={airflow.password} make serve\n"
          f"logs, PIDs:   {HOME}\nstop with:    make airflow-stop")


if __name__ == "__main__":
    main()
