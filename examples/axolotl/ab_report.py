"""Compares two axolotl runs recorded by ab_probe.py (A: MOEPATCH=0, B: libmoepatch on) and prints them
side by side: tokens/s, mean step time (first --warmup steps left out), peak GPU memory
(torch.cuda.max_memory_allocated / max_memory_reserved), the moepatch lines of each console log, and
both loss curves (step, loss A, loss B, relative difference). Writes a JSON summary and a PNG plot.
A side may be missing (only one run): then only that side is shown. Exit status 1 when a given run
recorded no step. stdlib + matplotlib (optional: without it, no PNG).

    python3 ab_report.py --a A.jsonl --log-a A.log --b B.jsonl --log-b B.log --name NAME \
        [--warmup 3] [--json out.json] [--png out.png] [--wall-a S --wall-b S]
"""

import argparse
import json
import sys

GIB = 1024.0 ** 3


def load(path):
    steps, logs, end, init = {}, {}, None, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if rec["kind"] == "step":
                steps[rec["step"]] = rec
            elif rec["kind"] == "log":
                logs.setdefault(rec["step"], {}).update(rec["logs"])
            elif rec["kind"] == "end":
                end = rec
            elif rec["kind"] == "init":
                init = rec
    return steps, logs, end, init


def moepatch_lines(log_path):
    out = []
    if not log_path:
        return out
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if line.startswith("moepatch:") and line.strip() not in out:
                    out.append(line.strip())
    except OSError:
        pass
    return out


def summarize(path, log_path, warmup, wall):
    steps, logs, _, init = load(path)
    order = sorted(steps)
    res = {"jsonl": path, "log": log_path, "steps_recorded": len(order), "moepatch": moepatch_lines(log_path),
           "run_wall_s": wall, "init_sha256": init and init["sha256"]}
    if not order:
        return res, {}
    times, prev_end = {}, None
    for s in order:
        r = steps[s]
        times[s] = r["t_end"] - (prev_end if prev_end is not None else r["t_begin"])
        prev_end = r["t_end"]
    trainable, total, prev_tr, prev_tot = {}, {}, 0, 0
    for s in order:
        lg = logs.get(s, {})
        if "tokens/trainable" in lg:
            trainable[s] = lg["tokens/trainable"] - prev_tr
            prev_tr = lg["tokens/trainable"]
        if "tokens/total" in lg:
            total[s] = lg["tokens/total"] - prev_tot
            prev_tot = lg["tokens/total"]
    timed = [s for s in order if s > warmup] or order
    t_sum = sum(times[s] for s in timed)
    res["timed_steps"] = [timed[0], timed[-1]]
    res["mean_step_s"] = t_sum / len(timed)
    res["median_step_s"] = sorted(times[s] for s in timed)[len(timed) // 2]
    if all(s in trainable for s in timed):
        res["tokens_per_s"] = sum(trainable[s] for s in timed) / t_sum
        res["trainable_tokens_per_step"] = sum(trainable[s] for s in timed) / len(timed)
    if all(s in total for s in timed):
        res["token_slots_per_s"] = sum(total[s] for s in timed) / t_sum
        res["token_slots_per_step"] = sum(total[s] for s in timed) / len(timed)
    alloc = [steps[s]["max_allocated"] for s in order if "max_allocated" in steps[s]]
    resv = [steps[s]["max_reserved"] for s in order if "max_reserved" in steps[s]]
    res["peak_allocated_gib"] = max(alloc) / GIB if alloc else None
    res["peak_reserved_gib"] = max(resv) / GIB if resv else None
    res["train_runtime_s"] = next((lg["train_runtime"] for lg in logs.values() if "train_runtime" in lg), None)
    per_step = {s: {"loss": logs.get(s, {}).get("loss"), "grad_norm": logs.get(s, {}).get("grad_norm"),
                    "step_s": times[s]} for s in order}
    return res, per_step


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a")
    ap.add_argument("--log-a")
    ap.add_argument("--b")
    ap.add_argument("--log-b")
    ap.add_argument("--name", default="run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--wall-a", type=float)
    ap.add_argument("--wall-b", type=float)
    args = ap.parse_args()

    sides = {}
    for key, path, log, wall in (("A", args.a, args.log_a, args.wall_a), ("B", args.b, args.log_b, args.wall_b)):
        if path:
            sides[key] = summarize(path, log, args.warmup, wall)
    bad = [k for k, (res, _) in sides.items() if not res["steps_recorded"]]
    label = {"A": "A: MOEPATCH=0", "B": "B: moepatch"}
    keys = list(sides)

    print(f"== {args.name}: " + ", ".join(f"{label[k]}" for k in keys) + f" (timing leaves out steps 1..{args.warmup} where there are more)")
    for k in keys:
        tr = sides[k][0].get("timed_steps")
        sides[k][0]["timed"] = f"{tr[0]}-{tr[1]}" if tr else None
    rows = [("steps recorded", "steps_recorded", "d"), ("steps timed", "timed", "s"), ("trainable tokens/step", "trainable_tokens_per_step", ".0f"),
            ("tokens/s (trainable)", "tokens_per_s", ".1f"), ("mean step time (s)", "mean_step_s", ".4f"),
            ("median step time (s)", "median_step_s", ".4f"), ("peak allocated (GiB)", "peak_allocated_gib", ".2f"),
            ("peak reserved (GiB)", "peak_reserved_gib", ".2f"), ("train_runtime (s)", "train_runtime_s", ".1f"),
            ("whole run, wall (s)", "run_wall_s", ".1f")]
    print(f"{'':24s}" + "".join(f"{label[k]:>18s}" for k in keys))
    for title, key, spec in rows:
        print(f"{title:24s}" + "".join(f"{fmt(sides[k][0].get(key), spec):>18s}" for k in keys))
    summary = {"name": args.name, "warmup": args.warmup}
    for k in keys:
        summary[k] = sides[k][0]
        for line in sides[k][0]["moepatch"] or ["(no moepatch line)"]:
            print(f"{label[k]}: {line}")
    if "A" in sides and "B" in sides and sides["A"][0].get("mean_step_s") and sides["B"][0].get("mean_step_s"):
        summary["speedup_step_time"] = sides["A"][0]["mean_step_s"] / sides["B"][0]["mean_step_s"]
        print(f"speed-up (mean step time A / B): {summary['speedup_step_time']:.2f}x")

    if "A" in sides and "B" in sides:
        ia, ib = sides["A"][0]["init_sha256"], sides["B"][0]["init_sha256"]
        summary["same_init"] = None if None in (ia, ib) else ia == ib
        if summary["same_init"] is False:
            print("WARNING: A and B start from different trainable parameters (initial digest differs): "
                  "the loss curves below compare two initialisations, not the library")

    all_steps = sorted(set().union(*(set(sides[k][1]) for k in keys)))
    table = []
    print(f"{'step':>5s}" + "".join(f"{'loss ' + k:>14s}" for k in keys) + ("   rel diff" if len(keys) == 2 else ""))
    for s in all_steps:
        vals = [sides[k][1].get(s, {}).get("loss") for k in keys]
        row = {"step": s}
        for k, v in zip(keys, vals):
            row["loss_" + k] = v
            row["step_s_" + k] = sides[k][1].get(s, {}).get("step_s")
        line = f"{s:5d}" + "".join(f"{fmt(v, '.6f'):>14s}" for v in vals)
        if len(keys) == 2 and None not in vals:
            row["rel_diff"] = abs(vals[1] - vals[0]) / max(abs(vals[0]), 1e-12)
            line += f"   {row['rel_diff']:.2e}"
        table.append(row)
        print(line)
    rels = [r["rel_diff"] for r in table if "rel_diff" in r]
    if rels:
        summary["max_rel_diff"] = max(rels)
        summary["final_rel_diff"] = rels[-1]
        print(f"loss rel diff: max {max(rels):.2e}, last step {rels[-1]:.2e}")
    summary["per_step"] = table
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    if args.png and table:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
            for k, style in zip(keys, ("-", "--")):
                pts = [(r["step"], r["loss_" + k]) for r in table if r.get("loss_" + k) is not None]
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label[k])
                pts = [(r["step"], r["step_s_" + k]) for r in table if r.get("step_s_" + k) is not None]
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label[k])
            ax1.set(xlabel="step", ylabel="training loss", title=f"{args.name}: loss")
            ax2.set(xlabel="step", ylabel="step time (s)", title="wall time per step", yscale="log")
            for ax in (ax1, ax2):
                ax.grid(alpha=0.3)
                ax.legend()
            fig.tight_layout()
            fig.savefig(args.png, dpi=110)
        except ImportError:
            print("matplotlib not available: no PNG", file=sys.stderr)
    if bad:
        print(f"no step recorded for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
