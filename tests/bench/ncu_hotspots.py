#!/usr/bin/env python3
"""The hottest instructions of one kernel in an Nsight Compute report: reads the CSV of
`ncu --import REP --page source --print-source sass --csv` on stdin and prints the N instructions
with the most warp-stall samples, with their stall reasons (the columns that name one), and the
share of all samples per stall reason.

    ncu --import rep.ncu-rep --page source --print-source sass --csv | python3 ncu_hotspots.py [N]
"""

import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    lines = [line for line in sys.stdin if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith('"') and "Source" in line), 0)
    rows = list(csv.reader(lines[start:]))
    if not rows:
        print("no CSV rows")
        return 1
    head, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]
    samples = next((i for i, h in enumerate(head) if "Warp Stall Sampling (All" in h), None)
    source = next((i for i, h in enumerate(head) if h.strip() == "Source"), 1)
    if samples is None:
        print("no stall-sampling column; columns:", head)
        return 1
    reasons = [i for i, h in enumerate(head) if "stall" in h.lower() and i != samples and "Not-issued" not in h]
    total = sum(number(r[samples]) for r in body) or 1.0
    print("%d instructions, %d stall samples" % (len(body), total))
    shares = sorted(((sum(number(r[i]) for r in body), head[i]) for i in reasons), reverse=True)
    for v, name in shares[:12]:
        if v:
            print("  %5.1f%%  %s" % (100 * v / total, name))
    print("top %d instructions:" % top)
    for r in sorted(body, key=lambda r: -number(r[samples]))[:top]:
        why = sorted(((number(r[i]), head[i]) for i in reasons if number(r[i])), reverse=True)[:3]
        print("  %5.1f%%  %-60s %s" % (100 * number(r[samples]) / total, r[source].strip()[:60],
                                        ", ".join("%s %d" % (n.split("(")[0].strip()[-28:], v) for v, n in why)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
