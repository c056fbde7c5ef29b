#!/usr/bin/env python3
"""Turns normkit's benchmark JSON into a Markdown table and a chart.

Reads the files the bench binaries write with
    --benchmark_out=FILE.json --benchmark_out_format=json
(bench/bench_common.hpp labels every run with key=value fields: op, kind, dir, shape,
threads, bytes, target, vs, vs_target, impl, ...), and writes

  * a Markdown report (stdout, or --markdown FILE): one row per kernel and baseline with
    op, dir, shape, threads, GB/s, the best copy-roofline GB/s at the same shape,
    direction and thread count (measured by the same binary in the same run), their
    ratio, the kernel's target, and normkit's speed ratio over oneDNN with the issue's
    target; it starts with the normkit-vs-oneDNN comparison alone;
  * a chart (--svg FILE; gnuplot, Debian package gnuplot-nox): at one thread count
    (--threads, default 1), for every op/dir/shape that has a baseline, grouped bars of
    the ratio to the copy roofline for normkit, oneDNN, naive Eigen and the two-pass
    pattern (bench_common.hpp), with normkit's speedup over oneDNN under each group.

GB/s is the median over repetitions (the "median" aggregate when the run had
repetitions, else the median of the iterations), 1e9 bytes/s of the counted traffic.

Series: kind=kernel is normkit; a baseline whose op starts with "onednn_" is oneDNN,
"eigen_naive_" naive Eigen, "pattern_" the two-pass pattern (others are listed in the
table only). A baseline is paired with the normkit op named by its vs field, else with
its op without that prefix.

Usage:
  scripts/bench_report.py build/main/bench-json/*.json --markdown docs/bench_report.md \\
      --svg docs/bench_ratio.svg
Standard library only (python3 >= 3.7).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

SERIES = [  # (name, op prefix of its baselines or None for normkit kernels, colour)
    ("normkit", None, "#1f5fa6"),
    ("oneDNN", "onednn_", "#e07b17"),
    ("naive Eigen", "eigen_naive_", "#8c8c8c"),
    ("two-pass pattern", "pattern_", "#5aa05a"),
]

PRETTY_OP = {
    "layer_norm": "LayerNorm",
    "rms_norm": "RMSNorm",
    "batch_norm_cf": "BatchNorm NCHW",
    "batch_norm_cl": "BatchNorm NHWC",
    "group_norm_cf": "GroupNorm",
    "group_norm_cl": "GroupNorm NHWC",
    "instance_norm_cf": "InstanceNorm",
    "instance_norm_cl": "InstanceNorm NHWC",
}


def parse_label(label):
    fields = {}
    for part in (label or "").split():
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


class Entry:
    """One benchmark (op, dir, shape, threads) of one file."""

    def __init__(self, source, file_index, fields):
        self.source = source
        self.file_index = file_index
        self.fields = fields
        self.op = fields["op"]
        self.kind = fields.get("kind", "")
        self.dir = fields.get("dir", "")
        self.shape = fields.get("shape", "")
        self.threads = int(fields.get("threads", "0"))
        self.target = float(fields["target"]) if "target" in fields else None
        self.vs = fields.get("vs")
        self.vs_target = float(fields["vs_target"]) if "vs_target" in fields else None
        self.seq = int(fields.get("seq", "0"))
        self.median = None  # bytes/s, the "median" aggregate
        self.samples = []  # bytes/s per iteration run
        self.error = None

    def key(self):
        return (self.source, self.dir, self.shape, self.threads)

    def value(self):
        """Median bytes/s, or None if it did not run."""
        if self.median is not None:
            return self.median
        if self.samples:
            return statistics.median(self.samples)
        return None

    def series(self):
        if self.kind == "kernel":
            return "normkit"
        for name, prefix, _ in SERIES:
            if prefix and self.op.startswith(prefix):
                return name
        return None

    def compared_op(self):
        """The normkit op a baseline is compared with."""
        if self.vs:
            return self.vs
        for _, prefix, _ in SERIES:
            if prefix and self.op.startswith(prefix):
                return self.op[len(prefix):]
        return None


def load(paths):
    """Entries in file order, and each file's context."""
    entries, by_name, contexts = [], {}, {}
    for index, path in enumerate(paths):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        contexts[path] = data.get("context", {})
        for b in data.get("benchmarks", []):
            fields = parse_label(b.get("label", ""))
            if "op" not in fields:
                continue  # not one of normkit's benches (or an unlabelled file)
            name = (path, b.get("run_name", b.get("name")))
            e = by_name.get(name)
            if e is None:
                e = by_name[name] = Entry(path, index, fields)
                entries.append(e)
            if b.get("error_occurred"):
                e.error = b.get("error_message", "error")
                continue
            bps = b.get("bytes_per_second")
            if bps is None:
                continue
            if b.get("run_type") == "aggregate":
                if b.get("aggregate_name") == "median":
                    e.median = float(bps)
            else:
                e.samples.append(float(bps))
    # Runs are interleaved at random: order as the binaries registered them.
    entries.sort(key=lambda e: (e.file_index, e.seq))
    return entries, contexts


def rooflines(entries):
    """The best roofline per (file, dir, shape, threads): (bytes/s, op)."""
    best = {}
    for e in entries:
        v = e.value()
        if e.kind != "roofline" or v is None:
            continue
        if e.key() not in best or v > best[e.key()][0]:
            best[e.key()] = (v, e.op)
    return best


def pairs(entries):
    """{(normkit entry, series name): baseline entry} for baselines of known series."""
    kernels = {(e.key(), e.op): e for e in entries if e.kind == "kernel"}
    out = {}
    for e in entries:
        series = e.series()
        if e.kind != "baseline" or series is None:
            continue
        k = kernels.get((e.key(), e.compared_op()))
        if k is not None:
            out[(id(k), series)] = e
    return out


def gbs(v):
    return "n/a" if v is None else "%.2f" % (v / 1e9)


def mark(value, target):
    return "ok" if value >= target else "MISS"


def md_cell(text):
    return text.replace("|", "\\|")


def markdown(entries, contexts):
    best = rooflines(entries)
    paired = pairs(entries)
    lines = []

    ctx = next(iter(contexts.values()), {})
    mode = ctx.get("normkit_bench_mode", "?")
    onednn = sorted({c.get("normkit_onednn") for c in contexts.values() if c.get("normkit_onednn")})
    lines.append("Generated by `scripts/bench_report.py` from %s (%s mode, %s, %s CPU(s) at %s MHz)."
                 % (", ".join("`%s`" % os.path.basename(p) for p in contexts),
                    mode, ctx.get("date", "?"), ctx.get("num_cpus", "?"),
                    ctx.get("mhz_per_cpu", "?")))
    lines.append("GB/s: 1e9 bytes/s of the counted traffic, median of the repetitions; "
                 "roofline: the best copy of the same bytes (same binary, same run); "
                 "ratio = GB/s / roofline GB/s.")
    if onednn:
        lines.append("oneDNN: %s." % "; ".join(onednn))
    lines.append("")

    # normkit against oneDNN.
    cmp_rows = []
    for e in sorted(entries, key=lambda e: (e.threads, e.file_index, e.dir != "fwd", e.seq)):
        o = paired.get((id(e), "oneDNN"))
        if o is None:
            continue
        ours, theirs = e.value(), o.value()
        roof = best.get(e.key(), (None, ""))[0]
        speed = ours / theirs if ours and theirs else None
        tgt = o.vs_target
        cmp_rows.append("| %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (
            e.op, e.dir, e.shape, e.threads, gbs(ours), gbs(theirs),
            "%.2f / %.2f" % (ours / roof, theirs / roof) if ours and theirs and roof else "n/a",
            "%.2f×" % speed if speed else "n/a",
            "≥ %.1f× %s" % (tgt, mark(speed, tgt)) if tgt and speed else ""))
    if cmp_rows:
        lines.append("### normkit against oneDNN")
        lines.append("")
        lines.append("| op | dir | shape | threads | normkit GB/s | oneDNN GB/s "
                     "| ratio to roofline (normkit / oneDNN) | normkit / oneDNN | target |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---|")
        lines.extend(cmp_rows)
        lines.append("")

    # Every kernel and baseline.
    lines.append("### All kernels and baselines")
    lines.append("")
    lines.append("| op | dir | shape | threads | GB/s | roofline GB/s | ratio | target "
                 "| normkit / oneDNN |")
    lines.append("|---|---|---|---:|---:|---:|---:|---|---|")
    for e in entries:
        if e.kind == "roofline":
            continue
        v = e.value()
        roof, roof_op = best.get(e.key(), (None, ""))
        ratio = v / roof if v and roof else None
        target = ("%.2f %s" % (e.target, mark(ratio, e.target))
                  if e.target is not None and ratio is not None else "")
        vs = ""
        o = paired.get((id(e), "oneDNN"))
        if o is not None and v and o.value():
            s = v / o.value()
            vs = "%.2f×" % s
            if o.vs_target:
                vs += " (≥ %.1f× %s)" % (o.vs_target, mark(s, o.vs_target))
        lines.append("| %s | %s | %s | %d | %s | %s | %s | %s | %s |" % (
            e.op, e.dir, e.shape, e.threads,
            "error: %s" % md_cell(e.error.split(";")[0]) if e.error and v is None else gbs(v),
            "%s (%s)" % (gbs(roof), roof_op) if roof else "n/a",
            "%.3f" % ratio if ratio is not None else "n/a", target, vs))
    lines.append("")
    return "\n".join(lines)


def gp_string(s):
    return '"%s"' % s.replace("\\", "\\\\").replace('"', '\\"')


def chart_groups(entries, threads):
    """{dir: [(xtic label, {series: ratio to roofline})]} for the kernels at that thread
    count that have a baseline, in op then registration order."""
    best = rooflines(entries)
    paired = pairs(entries)
    panels = {"fwd": [], "bwd": []}
    for e in sorted(entries, key=lambda e: (e.file_index, e.seq)):
        if e.kind != "kernel" or e.threads != threads or e.dir not in panels:
            continue
        others = {s: paired[(id(e), s)] for s, _, _ in SERIES[1:] if (id(e), s) in paired}
        roof = best.get(e.key(), (None, ""))[0]
        if not others or not roof:
            continue
        ratios = {}
        if e.value():
            ratios["normkit"] = e.value() / roof
        for s, o in others.items():
            if o.value():
                ratios[s] = o.value() / roof
        label = "%s\\n%s" % (PRETTY_OP.get(e.op, e.op), e.shape)
        o = others.get("oneDNN")
        if o is not None and e.value() and o.value():
            label += "\\n%.2f× oneDNN" % (e.value() / o.value())
        panels[e.dir].append((label, ratios))
    return panels


def chart_script(entries, contexts, threads, out_path, terminal):
    """A gnuplot script drawing the grouped bars (a forward panel above a backward one),
    or None if there is nothing to draw."""
    panels = [(d, gs) for d, gs in chart_groups(entries, threads).items() if gs]
    if not panels:
        return None
    ratios = [r for _, gs in panels for _, rs in gs for r in rs.values()]
    ymax = max([1.0] + ratios) * 1.2
    most = max(len(gs) for _, gs in panels)
    width = max(900, 150 * most + 170)
    panel_height = 380
    ctx = next(iter(contexts.values()), {})
    mode = ctx.get("normkit_bench_mode", "?")
    date = ctx.get("date", "?")[:10]
    n = len(SERIES)
    box = 0.8 / n
    titles = {"fwd": "forward (reads x, writes y)",
              "bwd": "backward (reads x and dy, writes dx; dgamma, dbeta too)"}

    g = []
    height = panel_height * len(panels) + 60
    g.append("set terminal %s size %d,%d font 'Helvetica,15' background rgb 'white'"
             % (terminal, width, height))
    g.append("set output %s" % gp_string(out_path))
    # Data blocks: one per panel and series present there, x = group index + the series'
    # offset. (gnuplot 5.4 crashes on a block without a finite point, so none is written.)
    present = set()
    for p, (d, gs) in enumerate(panels):
        for k, (name, _, _) in enumerate(SERIES):
            rows = ["%.3f %.4f" % (i + (k - (n - 1) / 2.0) * box, rs[name])
                    for i, (_, rs) in enumerate(gs) if name in rs]
            if rows:
                present.add((p, k))
                g.append("$p%ds%d << EOD" % (p, k))
                g.extend(rows)
                g.append("EOD")
    g.append("set multiplot layout %d,1 title %s font ',17'" % (len(panels), gp_string(
        "Ratio to the copy roofline: GB/s / copy GB/s of the same bytes (1 = copy speed); "
        "%d thread%s, %s run, %s" % (threads, "" if threads == 1 else "s", mode, date))))
    g.append("set ylabel 'ratio to copy roofline'")
    g.append("set yrange [0:%.3f]" % ymax)
    g.append("set xrange [-0.6:%.1f]" % (most - 0.4))
    g.append("set grid ytics lc rgb '#dddddd'")
    g.append("set border 3")
    g.append("set ytics nomirror")
    g.append("set xtics nomirror scale 0 font ',13'")
    g.append("set bmargin 4.5")
    g.append("set style fill solid 0.9 noborder")
    g.append("set boxwidth %.3f" % box)
    g.append("set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 2 lw 1.5 "
             "lc rgb '#444444'")
    for p, (d, gs) in enumerate(panels):
        g.append("set title %s font ',15'" % gp_string(titles[d]))
        g.append("set xtics (%s)" % ", ".join('"%s" %d' % (lab, i) for i, (lab, _) in enumerate(gs)))
        if p == 0:  # the key between the figure's title and the first panel's
            g.append("set tmargin 4.5")
            g.append("set key at screen 0.5, screen %.4f center horizontal samplen 2 "
                     "font ',14'" % (1.0 - 62.0 / height))
        else:
            g.append("set tmargin 2.5")
            g.append("unset key")
        plots = ["NaN with lines dt 2 lw 1.5 lc rgb '#444444' title 'copy roofline'"]
        for k, (name, _, colour) in enumerate(SERIES):
            if (p, k) not in present:
                continue
            block = "$p%ds%d" % (p, k)
            plots.append("%s using 1:2 with boxes lc rgb '%s' title %s"
                         % (block, colour, gp_string(name)))
            plots.append("%s using 1:2:(sprintf('%%.2f', $2)) with labels offset 0,0.6 "
                         "font ',12' notitle" % block)
        g.append("plot " + ", \\\n     ".join(plots))
    g.append("unset multiplot")
    return "\n".join(g) + "\n"


def draw(script, keep=None):
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        sys.exit("bench_report: gnuplot not found (Debian: apt-get install gnuplot-nox)")
    if keep:
        with open(keep, "w", encoding="utf-8") as f:
            f.write(script)
    with tempfile.NamedTemporaryFile("w", suffix=".gp", delete=False, encoding="utf-8") as f:
        f.write(script)
        path = f.name
    try:
        r = subprocess.run([gnuplot, path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    if r.returncode != 0:
        sys.exit("bench_report: gnuplot failed:\n" + r.stderr)


def summary(entries):
    """'normkit/oneDNN targets met: k of n (misses: ...)'."""
    paired = pairs(entries)
    met, total, misses = 0, 0, []
    for e in entries:
        o = paired.get((id(e), "oneDNN"))
        if o is None or not o.vs_target or not e.value() or not o.value():
            continue
        total += 1
        s = e.value() / o.value()
        if s >= o.vs_target:
            met += 1
        else:
            misses.append("%s %s %s %.2fx < %.1fx" % (e.op, e.dir, e.shape, s, o.vs_target))
    if total == 0:
        return "no normkit/oneDNN comparison in the input"
    return "normkit/oneDNN targets met: %d of %d%s" % (
        met, total, " (misses: %s)" % "; ".join(misses) if misses else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="Google Benchmark JSON files of normkit's benches")
    ap.add_argument("--markdown", metavar="FILE", help="write the Markdown here (default stdout)")
    ap.add_argument("--svg", metavar="FILE", help="write the chart here (SVG, with gnuplot)")
    ap.add_argument("--png", metavar="FILE", help="also write the chart as PNG (gnuplot png)")
    ap.add_argument("--gnuplot-script", metavar="FILE", help="keep the gnuplot script here")
    ap.add_argument("--threads", type=int, default=1, help="thread count charted (default 1)")
    args = ap.parse_args()

    entries, contexts = load(args.json)
    if not entries:
        sys.exit("bench_report: no labelled normkit benchmark in %s" % ", ".join(args.json))
    md = markdown(entries, contexts)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(md)
    else:
        sys.stdout.write(md)

    for path, terminal in ((args.svg, "svg dynamic"), (args.png, "png")):
        if not path:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        script = chart_script(entries, contexts, args.threads, path, terminal)
        if script is None:
            print("bench_report: nothing to chart at %d thread(s) (no baselines)" % args.threads,
                  file=sys.stderr)
            break
        draw(script, args.gnuplot_script)

    errors = [e for e in entries if e.error]
    for e in errors:
        print("bench_report: %s %s %s t%d: %s" % (e.op, e.dir, e.shape, e.threads, e.error),
              file=sys.stderr)
    print("bench_report: %d benchmarks from %d file(s); %s"
          % (len(entries), len(args.json), summary(entries)), file=sys.stderr)


if __name__ == "__main__":
    main()
