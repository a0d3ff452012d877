#!/usr/bin/env bash
# Edge benchmark: direct to the origin, through weft-proxy --cores 1 (examples/edge-http.yaml)
# and through HAProxy (nbthread 1), side by side in one run, interleaved over ROUNDS rounds.
#
#   bash bench/edge.sh                 # defaults: 3 rounds x 10 s, 32 connections
#   ROUNDS=5 DURATION=20 CONNS=64 bash bench/edge.sh
#
# Placement on a 2-CPU machine: the proxy under test on CPU 0; the origin and the load
# generator together on CPU 1 (the same for every target), so each proxy has one core to itself.
# Needs: haproxy (apt-get install haproxy). Every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} WARMUP=${WARMUP:-2} CONNS=${CONNS:-32}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
command -v haproxy >/dev/null || { echo "haproxy is not installed (apt-get install haproxy)"; exit 1; }
cargo build -q --release -p weft-dataplane -p weft-bench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
taskset -c "$LOAD_CPU" target/release/weft-bench origin --listen 127.0.0.1:18080 --body-bytes 64 2>/dev/null & pids+=($!)
taskset -c "$PROXY_CPU" target/release/weft-proxy --config examples/edge-http.yaml --cpus "$PROXY_CPU" \
  --admin 127.0.0.1:15000 --log warn & pids+=($!)
taskset -c "$PROXY_CPU" haproxy -f bench/configs/haproxy-edge.cfg -db 2>/dev/null & pids+=($!)
for port in 18080 15001 15101; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, kernel $(uname -r), $(haproxy -v | head -1 | cut -d' ' -f1-3)"
echo "# rounds=$ROUNDS duration=${DURATION}s warmup=${WARMUP}s connections=$CONNS, 64-byte responses"
load() { taskset -c "$LOAD_CPU" target/release/weft-bench load --url "http://127.0.0.1:$2/" --connections "$CONNS" \
  --duration "$DURATION" --warmup "$WARMUP" --label "$1" --json; }
for r in $(seq "$ROUNDS"); do
  load direct 18080; load weft 15001; load haproxy 15101
done | tee /tmp/weft-edge-bench.jsonl | python3 bench/summarize.py
