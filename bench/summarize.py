"""Summarize weft-bench --json lines (one per run) from stdin: every run, then medians by label.
Runs from bench/chain.sh also carry CPU seconds per 1000 requests of each sidecar (A, B)."""
import json
import statistics as st
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
cpu = any("cpu_a_s_per_1k" in r for r in rows)
for r in rows:
    extra = ""
    if cpu:
        extra = "  cpu/1k: A={:.4f}s B={:.4f}s".format(r["cpu_a_s_per_1k"], r["cpu_b_s_per_1k"])
    print("{:<10} rps={:>8.0f}  p50={:.3f}ms  p99={:.3f}ms  p99.9={:.3f}ms  errors={}{}".format(
        r["label"], r["rps"], r["p50_ms"], r["p99_ms"], r["p999_ms"], r["errors"], extra))
labels = []
for r in rows:
    if r["label"] not in labels:
        labels.append(r["label"])
med = {}
for label in labels:
    xs = [r for r in rows if r["label"] == label]
    m = lambda k: st.median(x.get(k, 0) for x in xs)
    med[label] = (m("rps"), m("p50_ms"), m("p99_ms"), m("p999_ms"), m("cpu_a_s_per_1k"),
                  m("cpu_b_s_per_1k"))
print()
if cpu:
    print("| target | requests/s (median) | p50 ms | p99 ms | p99.9 ms | CPU s / 1000 req, A | CPU s / 1000 req, B |")
    print("|---|---|---|---|---|---|---|")
else:
    print("| target | requests/s (median) | p50 ms | p99 ms | p99.9 ms |")
    print("|---|---|---|---|---|")
for label, (rps, p50, p99, p999, ca, cb) in med.items():
    line = "| {} | {:.0f} | {:.3f} | {:.3f} | {:.3f} |".format(label, rps, p50, p99, p999)
    if cpu:
        line += " {:.4f} | {:.4f} |".format(ca, cb) if label != "direct" else " - | - |"
    print(line)
print()
for other in ("haproxy", "nginx"):
    if "weft" in med and other in med:
        print("weft / {}: requests/s x{:.2f}, p99 x{:.2f}".format(
            other, med["weft"][0] / med[other][0], med["weft"][2] / med[other][2]))
if "weft" in med and "weft-authz" in med:
    print("authorization on ({}): requests/s {:+.1f}%".format(
        "weft-authz vs weft", (med["weft-authz"][0] / med["weft"][0] - 1) * 100))
