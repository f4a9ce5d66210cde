"""The closed loop, timed on this machine: from the onset of a drift to a new champion serving.

A trained project (ARTIFACTS with a champion, and the MLflow runs beside it) is copied into a work
folder. There the real parts run as a user runs them: the API under gunicorn with 2 workers
(`make serve`), Prometheus and Alertmanager (`make monitor`), the watcher (`make retrain-watch`),
and 05_simulate.py sending the held-out rows, first as they are (`real`, WARMUP seconds), then with
a concept drift (their label flipped above the median age) until the new champion serves and has
been judged on labels of its own. A probe client asks POST /predict throughout, one request at a
time, and keeps every answer's status, model version and latency.

Figures (benchmarks/results/loop.json and loop.md): detection (drift onset to the alert pending,
firing in Prometheus, and queued by the API's webhook), retraining (queued, started, the gate's
decision), swap (alias moved to the last answer of the old model), live average precision before,
during and after, failed requests (must be 0) and the probe's /predict p99 before the retraining,
during it and through the swap. Goal on 2 cores: alert to new champion served in under 10 minutes
with the default retraining budget.

The end-to-end test (tests/integration/test_loop.py) drives the same `Loop` on a small model.
Usage: python benchmarks/loop.py [--artifacts artifacts] [--config CONFIG] [--budget S]  (make bench-loop)
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "monitoring"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import stack as monitoring_stack

from rareml import registry
from rareml.config import load_config
from rareml.features import to_records
from rareml.model import load_model
from rareml.processes import free_port, stop_group, wait_http
from rareml.tracking import copy_file_store

DECAY = "RareMLLivePerformanceDecay"


class Probe(threading.Thread):
    """One client asking POST /predict every `every` seconds, one request at a time, until stopped:
    (seconds since `t0`, status, model version of the answer, latency) of each."""

    def __init__(self, port: int, records: list[dict], t0: float, every: float = 0.05, root: Path | None = None):
        super().__init__(name="loop-probe", daemon=True)
        self.port, self.records, self.t0, self.every, self.root = port, records, t0, every, root
        self.answers: list[tuple[float, int, str | None, float]] = []
        self.champions: list[tuple[float, str | None]] = []  # (when, version) each time the alias is seen moved
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            if self.root is not None:
                champion = registry.version_of(self.root, registry.CHAMPION)
                if not self.champions or self.champions[-1][1] != champion:
                    self.champions.append((time.monotonic() - self.t0, champion))
            body = json.dumps(self.records[i % len(self.records)])
            started = time.monotonic()
            status, version = 0, None
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = json.loads(response.read() or b"{}")
                status, version = response.status, response.getheader("X-Model-Version")
                if status == 200 and answer.get("model_version") != version:
                    status = -1  # the header and the body disagree: counted as a failure
            except Exception:  # noqa: BLE001 (any failure is an answer that did not come: status 0)
                status = 0
            finally:
                conn.close()
            done = time.monotonic()
            self.answers.append((started - self.t0, status, version, done - started))
            i += 1
            self.halt.wait(max(0.0, self.every - (done - started)))

    def stop(self) -> list[tuple[float, int, str | None, float]]:
        self.halt.set()
        self.join(timeout=60)
        return self.answers


class Loop:
    """The whole closed loop on this machine, every process started here and stopped by PID (also
    on failure): use as a context manager."""

    def __init__(self, artifacts: Path, work: Path, config: Path, *, mlruns: Path | None = None,
                 budget: float | None = None, bootstrap: int = 1000, rate: float = 20.0, feedback_delay: float = 2.0,
                 poll: float = 1.0, mlflow: bool = True, token: str = "loop-token"):
        """`artifacts`: a trained project's (with a champion); `mlruns`: its MLflow file store
        (default: the one beside it, if any), copied into `work` with the artifacts."""
        self.source, self.work, self.config = (Path(p).resolve() for p in (artifacts, work, config))
        self.mlruns = Path(mlruns).resolve() if mlruns else self.source.parent / "mlruns"
        self.budget = budget or load_config(self.config).retrain.budget_seconds
        self.bootstrap, self.rate, self.feedback_delay = bootstrap, rate, feedback_delay
        self.poll, self.mlflow, self.token = poll, mlflow, token
        self.root = self.work / "artifacts"
        self.db = self.root / "serving" / "predictions.db"
        self.procs: dict[str, subprocess.Popen] = {}
        self.simulations: list[subprocess.Popen] = []
        self.files: list = []  # the logs handed to the processes, closed at the end
        self.stack: monitoring_stack.Stack | None = None
        self.probe: Probe | None = None
        self.t0 = time.monotonic()
        self.events: dict[str, float] = {}  # name: seconds since t0

    # -- starting and stopping -------------------------------------------------------------
    def __enter__(self) -> Loop:  # noqa: PYI034
        self.work.mkdir(parents=True, exist_ok=True)
        skip = shutil.ignore_patterns("serving", "monitoring", "runs", "metrics-*", ".*.lock")
        shutil.copytree(self.source, self.root, symlinks=True, ignore=skip)
        if self.mlruns.is_dir():
            copy_file_store(self.mlruns, self.work / "mlruns")
        try:
            self.port = free_port()
            self.spawn("api", [ROOT / "04_serve.py", "--artifacts", self.root, "--port", self.port, "--workers", 2,
                               "--db", self.db, "--refresh", 1],
                       PROMETHEUS_MULTIPROC_DIR=str(self.work / "metrics"))
            wait_http(f"{self.url}/ready", self.procs["api"], 90, self.work / "api.log")
            self.stack = monitoring_stack.start(self.work / "monitoring", api=f"127.0.0.1:{self.port}",
                                                prometheus_port=free_port(), alertmanager_port=free_port(),
                                                token=self.token)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.probe is not None:
            self.probe.stop()
        for proc in self.simulations + list(self.procs.values())[::-1]:
            if proc.poll() is None:  # never a group whose leader is already reaped: its number may be reused
                stop_group(proc, seconds=30)
        monitoring_stack.stop(self.work / "monitoring")
        for file in self.files:
            file.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the work folder's ./mlruns
        return env | {"RAREML_ALERT_TOKEN": self.token, "MLFLOW_DISABLE_TELEMETRY": "true"} | extra

    def open(self, name: str):
        self.files.append(open(self.work / name, "ab"))  # noqa: SIM115 (closed in __exit__)
        return self.files[-1]

    def spawn(self, name: str, argv: list, stdout=None, **env: str) -> subprocess.Popen:
        """A project script in its own process group, its stderr in WORK/<name>.log."""
        proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=self.work,
                                stdout=stdout or subprocess.DEVNULL, stderr=self.open(f"{name}.log"),
                                start_new_session=True, env=self.env(**env))
        self.procs[name] = proc
        return proc

    def start_probe(self, every: float = 0.05) -> Probe:
        test = pd.read_parquet(self.root / "test.parquet")
        model = load_model(registry.serving_dir(self.root))
        self.probe = Probe(self.port, to_records(test.head(200), model.schema), self.t0, every, self.root)
        self.probe.start()
        return self.probe

    def start_watcher(self, *extra: str) -> subprocess.Popen:
        self.mark("watcher started")
        return self.spawn("watcher", [ROOT / "06_retrain.py", "--watch", "--config", self.config, "--artifacts",
                                      self.root, "--db", self.db, "--poll", self.poll, "--bootstrap", self.bootstrap,
                                      "--budget", self.budget, *([] if self.mlflow else ["--no-mlflow"]), *extra])

    def simulate(self, scenario: str, seconds: float, *extra: str) -> subprocess.Popen:
        """05_simulate.py on the held-out rows (age: the drifting feature), its summary on stdout."""
        n = len(self.simulations)
        self.mark(f"simulation {n} ({scenario}) started")
        proc = self.spawn(f"simulate-{n}", [ROOT / "05_simulate.py", "--url", self.url, "--artifacts", self.root,
                                            "--scenario", scenario, "--source", "test", "--features", "age",
                                            "--rate", self.rate, "--seconds", seconds, "--feedback-delay",
                                            self.feedback_delay, *extra],
                          stdout=self.open(f"simulate-{n}.json"))
        del self.procs[f"simulate-{n}"]
        self.simulations.append(proc)
        return proc

    def finish_simulation(self, proc: subprocess.Popen, stop: bool = True, seconds: float = 120) -> dict:
        """Its summary, once it has sent the labels still due (SIGTERM first when `stop`)."""
        if stop and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=seconds)
        n = self.simulations.index(proc)
        out = (self.work / f"simulate-{n}.json").read_text().strip().splitlines()
        if proc.returncode != 0 or not out:
            raise AssertionError(f"05_simulate.py exited with {proc.returncode}:\n{self.tail(f'simulate-{n}')}")
        return json.loads(out[-1])

    # -- looking ---------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, event: str) -> float:
        self.events.setdefault(event, round(self.now(), 2))
        return self.events[event]

    def since(self, epoch: float) -> float:
        """An epoch time (as the log records it) in seconds since t0."""
        return round(epoch - (time.time() - self.now()), 2)

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.work / f"{name}.log"
        return f"--- {name}.log\n" + (path.read_text(errors="replace")[-chars:] if path.exists() else "(none)")

    def wait_for(self, what: str, check, seconds: float, every: float = 1.0):
        """The first truthy `check()` within `seconds`; AssertionError with the logs' ends if none."""
        deadline, error = time.monotonic() + seconds, None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited ({proc.returncode}) while waiting for {what}\n"
                                         f"{self.tail(name)}")
            try:
                result = check()
            except (OSError, ValueError, KeyError) as exc:  # a server slow under the retraining: ask again
                result, error = None, exc
            if result:
                return result
            time.sleep(every)
        logs = "\n".join(self.tail(n) for n in ("api", "watcher") if n in self.procs)
        raise AssertionError(f"not within {seconds:g} s: {what} (last error: {error})\n{logs}")

    def get(self, url: str) -> dict:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read())

    def firing(self, alertname: str = DECAY) -> list[dict]:
        alerts = self.get(f"{self.stack.prometheus}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"]

    def retrains(self, alertname: str = DECAY, finished: bool = False) -> list[dict]:
        """GET /alerts' retrainings for this alert, oldest first (`finished`: those with an outcome
        other than not_enough_labels, which an earlier drift alert may have had)."""
        found = [r for r in self.get(f"{self.url}/alerts")["retrains"][::-1] if alertname in r["alertname"]]
        return [r for r in found if r["outcome"] not in (None, "not_enough_labels")] if finished else found

    def metrics(self) -> dict[tuple[str, tuple], float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=15) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, default: float = float("nan"), **labels: str) -> float:
        """The sum over the samples of `name` with these labels (`default` if there is none)."""
        found = [v for (n, lab), v in self.metrics().items() if n == name and labels.items() <= dict(lab).items()]
        return float(sum(found)) if found else default

    def live(self) -> dict:
        """The champion's live window, as /metrics shows it."""
        m = self.metrics()
        value = {n: v for (n, lab), v in m.items() if n in ("rareml_window_labeled", "rareml_window_predictions")}
        value |= {dict(lab)["metric"]: v for (n, lab), v in m.items() if n == "rareml_live_metric"}
        value["versions"] = sorted(dict(lab)["version"] for (n, lab), v in m.items() if n == "rareml_model_info" and v)
        return value


def p99(answers: list[tuple], start: float, end: float) -> float | None:
    latencies = [a[3] for a in answers if start <= a[0] < end and a[1] == 200]
    return round(float(np.percentile(latencies, 99)) * 1000, 1) if latencies else None


def closed_loop(loop: Loop, warmup: float, after_labels: int = 200, limit: float = 1800) -> dict:
    """Drift, alert, retraining, gate, promotion and swap, timed: the figures (and what the test
    asserts on). `warmup` seconds of undrifted traffic first (0: none)."""
    champion = registry.version_of(loop.root, registry.CHAMPION)
    loop.start_probe()
    loop.start_watcher()
    before = None
    if warmup:
        loop.finish_simulation(loop.simulate("real", warmup), stop=False, seconds=warmup + 120)
        before = loop.wait_for("the labels of the warm-up in the live window", lambda: (
            live := loop.live())["rareml_window_labeled"] >= min(after_labels, warmup * loop.rate * 0.9) and live, 60)
    onset = loop.mark("drift onset")
    drift = loop.simulate("concept", limit)
    pending = loop.wait_for(f"{DECAY} pending or firing", lambda: [
        a for a in loop.get(f"{loop.stack.prometheus}/api/v1/alerts")["data"]["alerts"]
        if a["labels"]["alertname"] == DECAY], 300)
    loop.mark("alert pending")
    firing = loop.wait_for(f"{DECAY} firing in Prometheus", loop.firing, 300)
    loop.mark("alert firing")
    during = loop.live()
    queued = loop.wait_for("a retraining queued by POST /alerts", loop.retrains, 120, every=0.5)
    loop.events["retraining queued"] = loop.since(queued[0]["queued"])
    done = loop.wait_for("the retraining's outcome", lambda: loop.retrains(finished=True), loop.budget + 600,
                         every=0.5)
    retraining = done[0]
    loop.events["retraining started"] = loop.since(retraining["started"])
    loop.events["retraining finished"] = loop.since(retraining["finished"])
    detail = retraining["detail"] or {}
    figures = {"champion": champion, "outcome": retraining["outcome"], "challenger": detail.get("challenger"),
               "retraining": detail, "alerts_fired": [a["labels"] for a in firing], "pending_labels": pending[0]["labels"],
               "live": {"before": before, "during": during}}
    new = detail.get("challenger") if retraining["outcome"] == "promoted" else None
    if new:
        gate = json.loads((loop.root / registry.GATES / f"{new}.json").read_text())
        figures["gate"] = gate
        loop.wait_for("both workers serving the new champion", lambda: loop.live()["versions"] == [new]
                      and loop.metric("rareml_model_reloads_total", result="ok") >= 2, 120, every=0.5)
        loop.mark("both workers serve the new champion (seen in /metrics)")
        figures["live"]["after"] = loop.wait_for(f"{after_labels} labels for the new champion", lambda: (
            live := loop.live())["rareml_window_labeled"] >= after_labels and live["versions"] == [new] and live,
            after_labels / loop.rate * 3 + 120)
    figures["reloads"] = {r: loop.metric("rareml_model_reloads_total", 0.0, result=r) for r in ("ok", "refused")}
    figures["simulation"] = loop.finish_simulation(drift)
    answers = loop.probe.stop()
    moved = [t for t, version in loop.probe.champions if new and version == new]
    if moved:
        loop.events["champion alias moved"] = round(moved[0], 2)
    figures["probe"] = summarise(answers, champion, new, loop.events, onset)
    figures["events"] = dict(sorted(loop.events.items(), key=lambda kv: kv[1]))
    return figures


def summarise(answers: list[tuple], old: str, new: str | None, events: dict, onset: float) -> dict:
    """The probe's answers: how many, how many failed, which versions when, p99 by phase."""
    statuses: dict[str, int] = {}
    for _, status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    summary = {"answers": len(answers), "statuses": statuses, "failed": sum(1 for a in answers if a[1] != 200)}
    started = events.get("retraining started")
    if new and any(a[2] == new for a in answers):
        first_new = next(a[0] for a in answers if a[2] == new)
        last_old = max((a[0] for a in answers if a[2] == old), default=first_new)
        summary |= {"first_new_answer": round(first_new, 2), "last_old_answer": round(last_old, 2),
                    "old_after_new": sum(1 for a in answers if a[2] == old and a[0] > first_new),
                    "versions_after_swap": sorted({a[2] for a in answers if a[0] > last_old})}
        events["first answer by the new champion"] = round(first_new, 2)
        events["last answer by the old champion"] = round(last_old, 2)
        swap = (first_new - 5, last_old + 10)
        summary["swap_window"] = [round(swap[0], 2), round(swap[1], 2)]
        summary["failed_in_swap"] = sum(1 for a in answers if swap[0] <= a[0] < swap[1] and a[1] != 200)
        summary["p99_ms"] = {"before retraining": p99(answers, onset, started or onset),
                             "during retraining": p99(answers, started or onset, swap[0]),
                             "through the swap": p99(answers, *swap), "after": p99(answers, swap[1], 1e9)}
    return summary


def timeline(figures: dict) -> dict:
    """The durations the issue asks for, in seconds."""
    e = figures["events"]
    spans = {"detection: drift onset to alert firing": ("drift onset", "alert firing"),
             "alert firing to retraining started": ("alert firing", "retraining started"),
             "retraining and gate: started to champion alias moved": ("retraining started", "champion alias moved"),
             "swap: alias moved to the last answer of the old model": ("champion alias moved",
                                                                       "last answer by the old champion"),
             "alert firing to new champion served": ("alert firing", "last answer by the old champion"),
             "drift onset to new champion served": ("drift onset", "last answer by the old champion")}
    return {name: round(e[b] - e[a], 1) for name, (a, b) in spans.items() if a in e and b in e}


def report(figures: dict, args: argparse.Namespace) -> str:
    t, probe, live = figures["timeline"], figures["probe"], figures["live"]
    detail = figures["retraining"]
    ap = lambda w: "-" if not w else f"{w.get('average_precision', float('nan')):.3f}"
    lines = [f"# The closed loop on {figures['machine']}", "",
             (f"`python benchmarks/loop.py --artifacts {args.artifacts} --config {args.config}` "
              f"(retraining budget {figures['budget']:.0f} s, {args.rate:g} predictions/s with labels after "
              f"{args.feedback_delay:g} s, a probe client asking /predict every 50 ms), {figures['date']}."), "",
             f"Outcome: **{figures['outcome']}** (champion {figures['champion']} -> challenger {figures['challenger']}).", "",
             "| span | seconds |", "|---|---:|", *[f"| {k} | {v} |" for k, v in t.items()], "",
             "| live window | labelled | average precision | recall |", "|---|---:|---:|---:|",
             *[f"| {name} | {w.get('rareml_window_labeled', 0):.0f} | {ap(w)} | {w.get('recall', float('nan')):.3f} |"
               for name, w in live.items() if w],
             "", f"Probe: {probe['answers']} answers, {probe['failed']} failed "
             f"({probe.get('failed_in_swap', '-')} in the swap window); /predict p99 (ms): "
             + ", ".join(f"{k} {v}" for k, v in probe.get("p99_ms", {}).items()), "",
             f"Simulator: {json.dumps(figures['simulation'])}", ""]
    if figures.get("gate"):
        g = figures["gate"]["average_precision"]
        lines.append(f"Gate: {figures['gate']['rows']} rows ({figures['gate']['positives']} positive); AP champion "
                     f"{g['champion']['value']:.3f}, challenger {g['challenger']['value']:.3f}, difference "
                     f"{g['difference']['value']:+.3f} [{g['difference']['low']:+.3f}, {g['difference']['high']:+.3f}]; "
                     f"retraining {detail.get('seconds')} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default=ROOT / "artifacts", type=Path, help="a trained project's artifacts")
    parser.add_argument("--mlruns", type=Path, default=None, help="its MLflow store (default: beside ARTIFACTS)")
    parser.add_argument("--config", default=ROOT / "configs" / "census_income_kdd.toml", type=Path)
    parser.add_argument("--budget", type=float, default=None, help="retraining budget (default: the config's)")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--feedback-delay", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds of undrifted traffic first")
    parser.add_argument("--work", type=Path, default=None, help="the work folder (default: a new temporary one)")
    parser.add_argument("--out", default=ROOT / "benchmarks" / "results", type=Path)
    args = parser.parse_args()
    if registry.version_of(args.artifacts, registry.CHAMPION) is None:
        raise SystemExit(f"error: no champion in {args.artifacts}: run make all first")
    if not shutil.which("prometheus"):
        raise SystemExit("error: prometheus not found: apt-get install prometheus prometheus-alertmanager")
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="rareml-loop-"))
    with Loop(args.artifacts, work, args.config, mlruns=args.mlruns, budget=args.budget, rate=args.rate,
              feedback_delay=args.feedback_delay) as loop:
        figures = closed_loop(loop, args.warmup)
    figures |= {"timeline": timeline(figures), "budget": loop.budget, "work": str(work),
                "machine": f"{platform.node()} ({os.cpu_count()} cores)",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loop.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (args.out / "loop.md").write_text(report(figures, args))
    print(report(figures, args))


if __name__ == "__main__":
    main()
