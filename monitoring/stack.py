"""The monitoring stack on this machine, without Docker: Prometheus and Alertmanager binaries
(Debian: `apt-get install prometheus prometheus-alertmanager`) started on 127.0.0.1 with the
project's prometheus.yml and monitoring/alertmanager.yml, their service host names rewritten to
local addresses. `make monitor` / `make monitor-stop`; the integration test uses the same code.

  python monitoring/stack.py start --api 127.0.0.1:8000   (RAREML_ALERT_TOKEN: the API's token)
  python monitoring/stack.py stop
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python monitoring/stack.py`: the project's package beside it
    sys.path.insert(0, str(ROOT))
from rareml.processes import stop_group, wait_http

WORK = ROOT / "artifacts" / "monitoring"


@dataclass(frozen=True)
class Stack:
    prometheus: str  # base URLs
    alertmanager: str
    pids: dict[str, int]


def binary(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    raise SystemExit(f"error: {names[0]} not found: apt-get install prometheus prometheus-alertmanager")


def write_configs(work: Path, api: str, prometheus_port: int, alertmanager_port: int, token: str) -> tuple[Path, Path]:
    """prometheus.yml and alertmanager.yml with local addresses, the rules path made absolute and
    the webhook token in a private file."""
    work.mkdir(parents=True, exist_ok=True)
    token_file = work / "alert_token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    prometheus = (ROOT / "prometheus.yml").read_text()
    prometheus = (prometheus.replace('"api:8000"', f'"{api}"')
                  .replace('"alertmanager:9093"', f'"127.0.0.1:{alertmanager_port}"')
                  .replace('"localhost:9090"', f'"127.0.0.1:{prometheus_port}"')
                  .replace("- monitoring/alerts.yml", f"- {ROOT / 'monitoring' / 'alerts.yml'}"))
    alertmanager = (ROOT / "monitoring" / "alertmanager.yml").read_text()
    alertmanager = (alertmanager.replace("http://api:8000/alerts", f"http://{api}/alerts")
                    .replace("/run/secrets/rareml_alert_token", str(token_file)))
    (work / "prometheus.yml").write_text(prometheus)
    (work / "alertmanager.yml").write_text(alertmanager)
    return work / "prometheus.yml", work / "alertmanager.yml"


def spawn(name: str, command: list[str], work: Path) -> subprocess.Popen:
    log = work / f"{name}.log"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),  # noqa: SIM115
                            start_new_session=True)
    (work / f"{name}.pid").write_text(str(proc.pid))
    return proc


def start(work: Path = WORK, api: str = "127.0.0.1:8000", prometheus_port: int = 19090,
          alertmanager_port: int = 19093, token: str | None = None) -> Stack:
    """Start both on 127.0.0.1 (fresh data folders) and wait until they are ready."""
    token = token or os.environ.get("RAREML_ALERT_TOKEN")
    if not token:
        raise SystemExit("error: set RAREML_ALERT_TOKEN (the same as the API's) so alerts reach its webhook")
    stop(work)
    prometheus_cfg, alertmanager_cfg = write_configs(work, api, prometheus_port, alertmanager_port, token)
    for data in ("prometheus-data", "alertmanager-data"):
        shutil.rmtree(work / data, ignore_errors=True)
    am = spawn("alertmanager", [binary("prometheus-alertmanager", "alertmanager"), f"--config.file={alertmanager_cfg}",
                                f"--storage.path={work / 'alertmanager-data'}", "--cluster.listen-address=",
                                f"--web.listen-address=127.0.0.1:{alertmanager_port}"], work)
    prom = spawn("prometheus", [binary("prometheus"), f"--config.file={prometheus_cfg}",
                                f"--storage.tsdb.path={work / 'prometheus-data'}",
                                f"--web.listen-address=127.0.0.1:{prometheus_port}"], work)
    stack = Stack(f"http://127.0.0.1:{prometheus_port}", f"http://127.0.0.1:{alertmanager_port}",
                  {"prometheus": prom.pid, "alertmanager": am.pid})
    try:
        wait_http(f"{stack.alertmanager}/-/ready", am, log=work / "alertmanager.log")
        wait_http(f"{stack.prometheus}/-/ready", prom, log=work / "prometheus.log")
    except RuntimeError:
        stop(work)
        raise
    return stack


def stop(work: Path = WORK) -> None:
    """Stop what `start` started, by the PIDs it wrote."""
    for name in ("prometheus", "alertmanager"):
        pid_file = work / f"{name}.pid"
        if not pid_file.exists():
            continue
        stop_group(int(pid_file.read_text()), seconds=10)
        pid_file.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--api", default="127.0.0.1:8000", help="host:port of the API (make serve)")
    parser.add_argument("--prometheus-port", type=int, default=19090)
    parser.add_argument("--alertmanager-port", type=int, default=19093)
    args = parser.parse_args()
    if args.action == "stop":
        stop()
        print("monitoring stopped")
        return
    try:
        stack = start(api=args.api, prometheus_port=args.prometheus_port, alertmanager_port=args.alertmanager_port)
    except RuntimeError as exc:
        sys.exit(f"error: {exc}")
    print(f"Prometheus:   {stack.prometheus} (alerts: /alerts, or /classic/alerts on Debian's build)\n"
          f"Alertmanager: {stack.alertmanager}\nlogs and PIDs: {WORK}\nstop with: make monitor-stop")


if __name__ == "__main__":
    main()
