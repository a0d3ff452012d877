#!/usr/bin/env bash
# Quick start: builds weft, starts a demo app (weft-bench origin) on 127.0.0.1:18080 and
# weft-proxy on examples/edge-http.yaml (HTTP 127.0.0.1:15001) and examples' TCP listener,
# sends a request through it, prints the admin URLs, and keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p weft-dataplane -p weft-bench
ulimit -l unlimited 2>/dev/null || true
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT INT TERM
target/release/weft-bench origin --listen 127.0.0.1:18080 --body "hello from the app behind weft" & pids+=($!)
target/release/weft-proxy --config examples/edge-http.yaml --admin 127.0.0.1:15000 & pids+=($!)
for _ in $(seq 100); do
  curl -sf http://127.0.0.1:15000/ready >/dev/null 2>&1 && break; sleep 0.1
done
echo
echo "== GET http://127.0.0.1:15001/ through weft-proxy"
curl -si http://127.0.0.1:15001/hello
echo
echo
echo "weft-proxy is serving examples/edge-http.yaml:"
echo "  traffic      http://127.0.0.1:15001/        (routes to the app on 127.0.0.1:18080)"
echo "  readiness    http://127.0.0.1:15000/ready"
echo "  metrics      http://127.0.0.1:15000/metrics"
echo "  config       http://127.0.0.1:15000/config_dump"
echo "  reload       kill -HUP ${pids[1]}   (after editing examples/edge-http.yaml)"
echo "Ctrl-C stops it (SIGTERM drains in-flight requests first)."
wait
