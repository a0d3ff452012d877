#!/usr/bin/env bash
# The weft scene: prod/order may call prod/checkout, nobody else may.
#
# Starts weft-control on examples/mesh (the demo mesh, PeerAuthentication STRICT and the
# AuthorizationPolicy "only prod/order may call prod/checkout"), three demo apps and their
# sidecars (prod/order-1, prod/checkout-1, prod/other-1), then shows step by step:
#   1. plaintext to checkout's sidecar          → DENIED (STRICT: no TLS, no name)
#   2. TLS, only the server proves its name      → DENIED (the caller has no name)
#   3. mTLS from order's sidecar                 → ALLOWED, both identities shown
#   4. mTLS from other's sidecar (prod/other)    → DENIED, 403 RBAC: access denied
# and keeps running with the admin URLs printed, until Ctrl-C.
#
# Needs curl and openssl (Debian: apt-get install curl openssl). Ports: 15012/15014 (control),
# 16N01 (sidecar inbound), 15N01 (sidecar outbound), 15N00 (sidecar admin), 18N01 (apps),
# N = 1 checkout, 2 order, 3 other.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in curl openssl; do
  command -v "$tool" >/dev/null || { echo "mesh-demo: needs $tool (apt-get install $tool)" >&2; exit 1; }
done
cargo build -q --release -p weft-controlplane -p weft-dataplane -p weft-bench
ulimit -l unlimited 2>/dev/null || true
B=target/release
D=$(mktemp -d /tmp/weft-demo.XXXXXX)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$D"; }
trap cleanup EXIT
trap 'exit 0' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
verdict() { printf '   \033[1m-> %s\033[0m\n' "$*"; }
wait_ok() { # url, what
  for _ in $(seq 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "mesh-demo: $2 did not come up; logs in $D" >&2; exit 1
}

$B/weft-control serve --config examples/mesh --data-dir "$D/data" >"$D/control.log" 2>&1 & pids+=($!)
wait_ok http://127.0.0.1:15014/ready weft-control

# app and sidecar N: inbound 16N01 (the WorkloadEntry's port), outbound 15N01, admin 15N00, app 18N01
start() { # workload N
  local wl=$1 n=$2
  $B/weft-bench origin --listen "127.0.0.1:18${n}01" --body "hello from the ${wl%-1} app" --echo \
    >"$D/app-$wl.log" 2>&1 & pids+=($!)
  $B/weft-control token "prod/$wl" --data-dir "$D/data" >"$D/$wl.token"
  $B/weft-proxy --control 127.0.0.1:15012 --token-file "$D/$wl.token" --cores 1 \
    --inbound "127.0.0.1:16${n}01" --outbound "127.0.0.1:15${n}01" --app "127.0.0.1:18${n}01" \
    --admin "127.0.0.1:15${n}00" >"$D/sidecar-$wl.log" 2>&1 & pids+=($!)
}
start checkout-1 1
start order-1 2
start other-1 3
for n in 1 2 3; do wait_ok "http://127.0.0.1:15${n}00/ready" "sidecar on :15${n}00"; done

say "1. plaintext HTTP straight to checkout's sidecar (127.0.0.1:16101)"
echo '   $ curl http://127.0.0.1:16101/'
if out=$(curl -s --max-time 5 http://127.0.0.1:16101/ 2>&1); then
  echo "$out"; verdict "unexpected: answered"
else
  echo "   connection closed without a response: the caller has no verifiable name"
  verdict "DENIED (PeerAuthentication prod/default is STRICT)"
fi

$B/weft-control mint prod/order-1 --data-dir "$D/data" --out "$D/mint" >/dev/null
say "2. TLS where only the server proves who it is (no client certificate)"
echo '   $ openssl s_client -connect 127.0.0.1:16101 -CAfile bundle.pem -verify_return_error'
out=$(printf 'GET / HTTP/1.1\r\nHost: checkout\r\nConnection: close\r\n\r\n' |
  timeout 5 openssl s_client -connect 127.0.0.1:16101 -CAfile "$D/mint/bundle.pem" \
    -verify_return_error -quiet 2>&1 || true)
server=$(echo | timeout 5 openssl s_client -connect 127.0.0.1:16101 -CAfile "$D/mint/bundle.pem" 2>/dev/null |
  openssl x509 -noout -ext subjectAltName 2>/dev/null | grep -o 'URI:[^, ]*' || true)
echo "   the client verified the server: ${server:-?}"
echo "   the server answered: $(echo "$out" | grep -io 'alert[^:]*:[^:]*$\|certificate required\|HTTP/1.1 [0-9]*' | head -1)"
verdict "DENIED (the server learns no name for the caller, and STRICT requires one)"

say "3. mTLS: order's app calls checkout through its sidecar (both sides verified)"
echo '   $ curl -H "Host: checkout.prod.svc.cluster.local" http://127.0.0.1:15201/'
out=$(curl -s -w '\n%{http_code}' -H 'Host: checkout.prod.svc.cluster.local' http://127.0.0.1:15201/)
echo "$out" | sed '$d' | sed 's/^/   /'
[[ $(echo "$out" | tail -1) == 200 ]] && verdict "ALLOWED: checkout's app sees By=<its own identity>;URI=<the caller's>" \
  || verdict "unexpected status $(echo "$out" | tail -1)"

say "4. mTLS, but the caller is prod/other"
echo '   $ curl -H "Host: checkout.prod.svc.cluster.local" http://127.0.0.1:15301/'
out=$(curl -s -w '\n%{http_code}' -H 'Host: checkout.prod.svc.cluster.local' http://127.0.0.1:15301/)
echo "   $(echo "$out" | tail -1) $(echo "$out" | sed '$d')"
verdict "DENIED by AuthorizationPolicy prod/checkout-allow-order"

cat <<EOF

The mesh keeps running (files in $D):
  control plane   http://127.0.0.1:15014/proxies   /state
  checkout-1      http://127.0.0.1:15100/metrics   /certs   /config_dump
  order-1         http://127.0.0.1:15200/metrics   /certs   /config_dump
  other-1         http://127.0.0.1:15300/metrics   /certs   /config_dump
  call as order   curl -H 'Host: checkout.prod.svc.cluster.local' http://127.0.0.1:15201/
  call as other   curl -H 'Host: checkout.prod.svc.cluster.local' http://127.0.0.1:15301/
Edit examples/mesh/security.yaml and the next request sees the change. Ctrl-C stops everything.
EOF
wait
