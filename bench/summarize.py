"""Summarize weft-bench --json lines (one per run) from stdin: every run, then medians by label."""
import json
import statistics as st
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
for r in rows:
    print("{:<8} rps={:>8.0f}  p50={:.3f}ms  p99={:.3f}ms  p99.9={:.3f}ms  errors={}".format(
        r["label"], r["rps"], r["p50_ms"], r["p99_ms"], r["p999_ms"], r["errors"]))
labels = []
for r in rows:
    if r["label"] not in labels:
        labels.append(r["label"])
med = {}
for label in labels:
    xs = [r for r in rows if r["label"] == label]
    med[label] = (st.median(x["rps"] for x in xs), st.median(x["p50_ms"] for x in xs),
                  st.median(x["p99_ms"] for x in xs), st.median(x["p999_ms"] for x in xs))
print()
print("| target | requests/s (median) | p50 ms | p99 ms | p99.9 ms |")
print("|---|---|---|---|---|")
for label, (rps, p50, p99, p999) in med.items():
    print("| {} | {:.0f} | {:.3f} | {:.3f} | {:.3f} |".format(label, rps, p50, p99, p999))
if "weft" in med and "haproxy" in med:
    print("\nweft / haproxy: requests/s x{:.2f}, p99 x{:.2f}".format(
        med["weft"][0] / med["haproxy"][0], med["weft"][2] / med["haproxy"][2]))
