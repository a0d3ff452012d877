#!/usr/bin/env bash
# Two-sidecar chain benchmark: load -> sidecar A (plain HTTP in) -> mTLS -> sidecar B (mTLS in,
# client certificate required) -> origin, built from weft, from HAProxy and from nginx with the
# same certificates (SVIDs minted by weft-control), TLS 1.3, one worker each; plus weft with a
# 1000-rule AuthorizationPolicy on B, and direct to the origin. Interleaved over ROUNDS rounds.
#
#   bash bench/chain.sh                      # defaults: 3 rounds x 10 s, 32 connections
#   ROUNDS=5 DURATION=10 bash bench/chain.sh
#
# Placement on a 2-CPU machine: both sidecars of every chain on CPU 0 (PROXY_CPU); origin, load
# generator and weft-control on CPU 1 (LOAD_CPU). CPU seconds per 1000 requests are read from
# /proc for each sidecar process over the whole load run (warm-up included, so the request count
# is scaled to warm-up + measurement at the measured rate).
# Needs haproxy and nginx (apt-get install haproxy nginx-light). Stops everything it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} WARMUP=${WARMUP:-2} CONNS=${CONNS:-32}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1} RULES=${RULES:-1000}
for t in haproxy nginx; do command -v $t >/dev/null || { echo "chain.sh: needs $t" >&2; exit 1; }; done
cargo build -q --release -p weft-controlplane -p weft-dataplane -p weft-bench
B=target/release
D=$(mktemp -d /tmp/weft-chain.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$D"; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
ulimit -l unlimited 2>/dev/null || true
wait_port() { for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
wait_ok() { for _ in $(seq 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "$1 never ready" >&2; exit 1; }

# ---- the mesh: client-1 (A), sink-1 (B, no policy), sink-authz-1 (B, RULES-rule ALLOW policy)
mkdir -p "$D/config"
{
  cat <<'EOF'
apiVersion: weft.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, certTTL: 24h}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bench}
spec: {mtls: {mode: STRICT}}
EOF
  for s in sink:17101 sink-authz:17201 client:17001; do
    name=${s%%:*} port=${s##*:}
    cat <<EOF
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: $name, namespace: bench}
spec:
  hosts: [$name.bench.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: $name}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: $name-1, namespace: bench}
spec: {address: 127.0.0.1, ports: {http: $port}, labels: {app: $name}, serviceAccount: $name}
EOF
  done
  cat <<'EOF'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sink-authz-rules, namespace: bench}
spec:
  selector: {matchLabels: {app: sink-authz}}
  action: ALLOW
  rules:
EOF
  for i in $(seq 2 "$RULES"); do
    echo "    - {from: [{source: {principals: [cluster.local/ns/bench/sa/caller-$i]}}], to: [{operation: {paths: [/p$i/*], methods: [GET]}}]}"
  done
  echo "    - {from: [{source: {principals: [cluster.local/ns/bench/sa/client]}}], to: [{operation: {methods: [GET]}}]}"
} >"$D/config/mesh.yaml"

taskset -c "$LOAD_CPU" $B/weft-bench origin --listen 127.0.0.1:18090 --body-bytes 64 2>/dev/null & pids+=($!)
taskset -c "$LOAD_CPU" $B/weft-control serve --config "$D/config" --data-dir "$D/data" \
  --listen 127.0.0.1:15412 --admin 127.0.0.1:15414 2>"$D/control.log" & pids+=($!)
wait_ok http://127.0.0.1:15414/ready
sidecar() { # workload inbound outbound admin
  $B/weft-control token "bench/$1" --data-dir "$D/data" >"$D/$1.token"
  taskset -c "$PROXY_CPU" $B/weft-proxy --control 127.0.0.1:15412 --token-file "$D/$1.token" \
    --cpus "$PROXY_CPU" --inbound "127.0.0.1:$2" --outbound "127.0.0.1:$3" \
    --app 127.0.0.1:18090 --admin "127.0.0.1:$4" --log warn 2>"$D/$1.log" & pids+=($!)
}
sidecar client-1 17001 17002 17003; WEFT_A=$!
sidecar sink-1 17101 17102 17103; WEFT_B=$!
sidecar sink-authz-1 17201 17202 17203; WEFT_BZ=$!
for a in 17003 17103 17203; do wait_ok "http://127.0.0.1:$a/ready"; done

# ---- the same identities' certificates for HAProxy and nginx
for w in client-1 sink-1; do
  $B/weft-control mint "bench/$w" --data-dir "$D/data" --out "$D/$w" >/dev/null
  cat "$D/$w/svid.pem" "$D/$w/key.pem" >"$D/$w/combined.pem"
done
haproxy_head() { cat <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 15s
EOF
}
{ haproxy_head; cat <<EOF
frontend a
    bind 127.0.0.1:17401
    default_backend b
backend b
    http-reuse always
    server b1 127.0.0.1:17402 ssl crt $D/client-1/combined.pem ca-file $D/client-1/bundle.pem verify required ssl-min-ver TLSv1.3
EOF
} >"$D/haproxy-a.cfg"
{ haproxy_head; cat <<EOF
frontend b
    bind 127.0.0.1:17402 ssl crt $D/sink-1/combined.pem ca-file $D/sink-1/bundle.pem verify required ssl-min-ver TLSv1.3
    default_backend app
backend app
    http-reuse always
    server app1 127.0.0.1:18090
EOF
} >"$D/haproxy-b.cfg"
nginx_conf() { # name, server block
  mkdir -p "$D/nginx-$1"
  cat >"$D/nginx-$1/nginx.conf" <<EOF
worker_processes 1;
pid $D/nginx-$1/nginx.pid;
error_log $D/nginx-$1/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $D/nginx-$1; proxy_temp_path $D/nginx-$1; fastcgi_temp_path $D/nginx-$1;
  uwsgi_temp_path $D/nginx-$1; scgi_temp_path $D/nginx-$1;
  keepalive_requests 1000000;
  $2
}
EOF
}
# A cannot check B's name: an SVID has no DNS name and nginx checks names only. A verifies
# nothing (which only spares nginx work); B requires and verifies A's certificate.
nginx_conf a "upstream b { server 127.0.0.1:17502; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:17501;
    location / { proxy_pass https://b; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_ssl_certificate $D/client-1/svid.pem; proxy_ssl_certificate_key $D/client-1/key.pem;
      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on; } }"
nginx_conf b "upstream app { server 127.0.0.1:18090; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:17502 ssl;
    ssl_certificate $D/sink-1/svid.pem; ssl_certificate_key $D/sink-1/key.pem;
    ssl_client_certificate $D/sink-1/bundle.pem; ssl_verify_client on; ssl_protocols TLSv1.3;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
taskset -c "$PROXY_CPU" haproxy -f "$D/haproxy-a.cfg" -db 2>/dev/null & pids+=($!); HAP_A=$!
taskset -c "$PROXY_CPU" haproxy -f "$D/haproxy-b.cfg" -db 2>/dev/null & pids+=($!); HAP_B=$!
taskset -c "$PROXY_CPU" nginx -c "$D/nginx-a/nginx.conf" -p "$D/nginx-a" -g 'daemon off;' 2>/dev/null & pids+=($!); NGX_A=$!
taskset -c "$PROXY_CPU" nginx -c "$D/nginx-b/nginx.conf" -p "$D/nginx-b" -g 'daemon off;' 2>/dev/null & pids+=($!); NGX_B=$!
for p in 18090 17401 17402 17501 17502; do wait_port $p; done

# every chain answers before anything is measured
check() { curl -sf -o /dev/null -H "Host: $2" "$1" || { echo "chain $1 ($2) does not answer" >&2; exit 1; }; }
check http://127.0.0.1:17002/ sink.bench.svc.cluster.local
check http://127.0.0.1:17002/ sink-authz.bench.svc.cluster.local
check http://127.0.0.1:17401/ x
check http://127.0.0.1:17501/ x

ticks() { # utime+stime of the processes and their children (threads included), in clock ticks
  local t=0 p
  [ "$1" = 0 ] && { echo 0; return; }
  for p in "$@" $(for q in "$@"; do pgrep -P "$q" || true; done); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo $t
}
HZ=$(getconf CLK_TCK)
run() { # label url host pidA pidB
  local a0 b0 a1 b1 out
  a0=$(ticks $4); b0=$(ticks $5)
  out=$(taskset -c "$LOAD_CPU" $B/weft-bench load --url "$2" --host "$3" --connections "$CONNS" \
    --duration "$DURATION" --warmup "$WARMUP" --label "$1" --json)
  a1=$(ticks $4); b1=$(ticks $5)
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); n=r["rps"]*(float(sys.argv[5])+float(sys.argv[6]))/1000
hz=float(sys.argv[4]); r["cpu_a_s_per_1k"]=int(sys.argv[2])/hz/n if n else 0; r["cpu_b_s_per_1k"]=int(sys.argv[3])/hz/n if n else 0
print(json.dumps(r))' "$out" $((a1 - a0)) $((b1 - b0)) "$HZ" "$DURATION" "$WARMUP"
}
echo "# $(date -u +%FT%TZ) $(nproc) CPUs, kernel $(uname -r), $(haproxy -v | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3)"
echo "# rounds=$ROUNDS duration=${DURATION}s warmup=${WARMUP}s connections=$CONNS, 64-byte responses, TLS 1.3 between the sidecars, authz rules=$RULES"
for r in $(seq "$ROUNDS"); do
  run direct http://127.0.0.1:18090/ x 0 0
  run weft http://127.0.0.1:17002/ sink.bench.svc.cluster.local $WEFT_A $WEFT_B
  run weft-authz http://127.0.0.1:17002/ sink-authz.bench.svc.cluster.local $WEFT_A $WEFT_BZ
  run haproxy http://127.0.0.1:17401/ x $HAP_A $HAP_B
  run nginx http://127.0.0.1:17501/ x $NGX_A $NGX_B
done | tee /tmp/weft-chain-bench.jsonl | python3 bench/summarize.py
curl -s http://127.0.0.1:17203/metrics | grep -E '^weft_authz_decisions_total|^weft_tls_handshakes_total' | sed 's/^/# sink-authz-1: /'
