#!/usr/bin/env python3
"""Helpers for bench/run.sh: parsing, statistics, the results table and the SVG chart.

Standard library only. Subcommands:
  confirm-link OUTBOX SEEN_LIST   print the confirm link of the newest .eml not in SEEN_LIST
  app-id EMAIL MODEL              read `applications list --json` on stdin, print the matching id
  batch FILE...                   curl -w '%{size_download} %{time_total}' lines -> "bytes n_ok"
  pct P FILE                      P-th percentile (nearest rank) of the numbers in FILE
  mkdata-small DIR N              write N small files (1-8 KiB) plus config.json into DIR
  report METRICS OUT_MD OUT_SVG   print the Markdown table, write it and the chart
  oha FILE                        oha's JSON output -> "req_per_s requests other_than_200"
"""
import glob
import json
import math
import os
import random
import re
import sys


def confirm_link(outbox, seen_file):
    seen = set()
    if os.path.exists(seen_file):
        seen = {l.strip() for l in open(seen_file) if l.strip()}
    files = [f for f in glob.glob(os.path.join(outbox, "*.eml")) if os.path.basename(f) not in seen]
    files.sort(key=os.path.getmtime, reverse=True)
    for f in files:
        raw = open(f, "rb").read().decode("utf-8", "replace")
        text = raw.replace("=\r\n", "").replace("=\n", "").replace("=3D", "=")
        m = re.search(r'https?://[^\s"<>]*confirm\?code=[^\s"<>&]*', text)
        if m:
            print(m.group(0))
            return 0
    return 1


def app_id(email, model):
    data = json.load(sys.stdin)
    if isinstance(data, dict):
        for k in ("applications", "items", "data"):
            if k in data:
                data = data[k]
                break
    for a in data:
        blob = json.dumps(a)
        if email in blob and model in blob:
            print(a.get("id"))
            return 0
    return 1


def batch(files):
    total, ok = 0, 0
    for f in files:
        for line in open(f):
            parts = line.split()
            if len(parts) >= 2:
                total += int(float(parts[0]))
                ok += 1
    print(total, ok)


def pct(p, path):
    xs = sorted(float(l) for l in open(path) if l.strip())
    if not xs:
        print("nan")
        return
    k = max(0, min(len(xs) - 1, math.ceil(p / 100.0 * len(xs)) - 1))
    print(xs[k])


def mkdata_small(d, n):
    os.makedirs(d, exist_ok=True)
    rnd = random.Random(42)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "bench", "n_files": n}, f)
    for i in range(n - 1):
        size = rnd.randint(1024, 8192)
        with open(os.path.join(d, "part-%03d.bin" % i), "wb") as f:
            f.write(os.urandom(size))


# ---------------------------------------------------------------- report

def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return "%.0f" % v
    if a >= 100:
        return "%.1f" % v
    if a >= 1:
        return "%.2f" % v
    return "%.3g" % v


def report(metrics_path, out_md, out_svg):
    rows = []  # (measure, wg, nginx, ratio, better)
    meta = []
    status = []
    for line in open(metrics_path):
        line = line.rstrip("\n")
        if not line:
            continue
        parts = line.split("\t")
        if parts[0] == "row":
            _, measure, wg, ng, better = parts
            wgv = float(wg) if wg not in ("", "n/a") else None
            ngv = float(ng) if ng not in ("", "n/a") else None
            ratio = wgv / ngv if (wgv is not None and ngv) else None
            rows.append((measure, wgv, ngv, ratio, better))
        elif parts[0] == "meta":
            meta.append(parts[1])
        elif parts[0] == "status":
            status.append(parts[1])
    out = []
    out.append("| measure | weightgate | nginx (or as the row says) | ratio |")
    out.append("| --- | ---: | ---: | ---: |")
    for measure, wgv, ngv, ratio, better in rows:
        arrow = {"higher": " (higher is better)", "lower": " (lower is better)"}.get(better, "")
        out.append("| %s%s | %s | %s | %s |" % (measure, arrow, fmt(wgv), fmt(ngv),
                                               fmt(ratio) if ratio is not None else "n/a"))
    out.append("")
    for m in meta:
        out.append("- " + m)
    for s in status:
        out.append("- **" + s + "**")
    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    with open(out_md, "w") as f:
        f.write(text)
    write_svg(out_svg, [(r[0], r[3], r[4]) for r in rows if r[3] is not None and r[3] > 0])


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_svg(path, bars):
    """Horizontal bars on a log axis, starting at ratio 1 (parity with nginx).
    Green = weightgate better than nginx in that measure, red = worse."""
    label_w, plot_w, row_h, top = 430, 420, 24, 50
    h = top + row_h * len(bars) + 40
    w = label_w + plot_w + 90
    lo, hi = -2.0, 2.0  # log10 range: 0.01x .. 100x
    for _, r, _ in bars:
        l = math.log10(r)
        lo, hi = min(lo, math.floor(l)), max(hi, math.ceil(l))

    def x(v):
        return label_w + (math.log10(v) - lo) / (hi - lo) * plot_w

    s = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">' % (w, h),
         '<rect width="100%" height="100%" fill="white"/>',
         '<text x="10" y="20" font-size="14" font-weight="bold">weightgate / nginx ratios (log scale, 1 = parity)</text>',
         '<text x="10" y="38" fill="#555">green: weightgate better than nginx on that measure; red: worse</text>']
    for e in range(int(lo), int(hi) + 1):
        xv = x(10 ** e)
        s.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s"/>' % (
            xv, top - 5, xv, top + row_h * len(bars), "#000" if e == 0 else "#ddd"))
        s.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%gx</text>' % (
            xv, top + row_h * len(bars) + 15, 10 ** e))
    for i, (name, r, better) in enumerate(bars):
        y = top + i * row_h
        good = (r >= 1) if better == "higher" else (r <= 1)
        x0, x1 = sorted((x(1), x(r)))
        s.append('<text x="%d" y="%d" text-anchor="end">%s</text>' % (label_w - 8, y + 15, esc(name[:62])))
        s.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>' % (
            x0, y + 3, max(x1 - x0, 1), row_h - 6, "#3a9d5d" if good else "#d0493d"))
        s.append('<text x="%.1f" y="%d">%s</text>' % (max(x(r), x(1)) + 4, y + 15, fmt(r)))
    s.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(s) + "\n")


def oha(path):
    with open(path) as f:
        d = json.load(f)
    codes = d.get("statusCodeDistribution") or {}
    total = sum(codes.values())
    print(f'{d["summary"]["requestsPerSec"]:.0f} {total} {total - codes.get("200", 0)}')


def main(argv):
    cmd = argv[1]
    if cmd == "confirm-link":
        return confirm_link(argv[2], argv[3])
    if cmd == "app-id":
        return app_id(argv[2], argv[3])
    if cmd == "batch":
        return batch(argv[2:])
    if cmd == "pct":
        return pct(float(argv[2]), argv[3])
    if cmd == "mkdata-small":
        return mkdata_small(argv[2], int(argv[3]))
    if cmd == "oha":
        return oha(argv[2])
    if cmd == "report":
        return report(argv[2], argv[3], argv[4])
    print("unknown command", cmd, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv) or 0)
