"""Turn a pytest-benchmark JSON run into bench/results/latest.md and PNG plots.

    python bench/report.py [RESULTS.json] [--out bench/results]

Without an argument the newest ``*.json`` in ``bench/results/`` is used. All
ratios compare backends measured in the same run (the machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

ORDER = ["memcpy", "c", "c-nopidfd", "socket", "mpconn", "zmq", "machipc-py", "machipc-c"]
NAMES = {
    "memcpy": "memcpy (one process)",
    "c": "C floor",
    "c-nopidfd": "C floor, no pidfd",
    "socket": "Python socket",
    "mpconn": "multiprocessing.connection",
    "zmq": "pyzmq",
    "machipc-py": "machipc (pure Python)",
    "machipc-c": "machipc (Cython)",
}


class Row:
    def __init__(self, bench: dict) -> None:
        info = bench["extra_info"]
        self.case: str = info["case"]
        self.backend: str = info["backend"]
        self.kind: str = info["kind"]
        self.messages: int = info["messages"]
        self.size: int = info["size"]
        self.clients: int = info.get("clients", 1)
        stats = bench["stats"]
        self.median: float = stats["median"]  # seconds per round
        self.rounds: int = stats["rounds"]
        data = stats.get("data") or []
        self.spread = (min(data), max(data)) if data else (stats["min"], stats["max"])

    @property
    def per_msg_us(self) -> float:
        """Microseconds per message: the RTT for latency cases."""
        return self.median / self.messages * 1e6

    @property
    def msg_per_s(self) -> float:
        return self.messages / self.median

    @property
    def gb_per_s(self) -> float:
        return self.messages * self.size / self.median / 1e9

    def cost(self) -> float:
        """Lower is better, comparable across backends of one case."""
        return self.median / self.messages


def load(path: Path) -> tuple[dict, dict[str, dict[str, Row]]]:
    doc = json.loads(path.read_text())
    cases: dict[str, dict[str, Row]] = defaultdict(dict)
    for bench in doc["benchmarks"]:
        if "case" not in bench.get("extra_info", {}):
            continue
        row = Row(bench)
        cases[row.case][row.backend] = row
    return doc, cases


def case_order(name: str) -> tuple:
    prefixes = ["rtt", "one-way 64", "one-way batched", "payload", "1 client ", "4 clients", "16 clients", "policy"]
    for i, p in enumerate(prefixes):
        if name.startswith(p):
            return (i, sizes_key(name), name)
    return (len(prefixes), 0, name)


def sizes_key(name: str) -> float:
    words = name.split()
    for a, b in zip(words, words[1:]):
        if b in ("B", "KiB", "MiB"):
            try:
                return float(a) * {"B": 1, "KiB": 1024, "MiB": 1024**2}[b]
            except ValueError:
                pass
    return 0


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def metric(row: Row) -> float:
    """The case's headline number: RTT µs (latency) or msg/s (throughput)."""
    return row.per_msg_us if row.kind == "latency" else row.msg_per_s


def table(cases: dict[str, dict[str, Row]]) -> list[str]:
    out = [
        "Latency cases: RTT per request, ratios are RTT / other's RTT (lower is better).",
        "Throughput cases: messages or bytes per second, ratios are rate / other's rate (higher is better).",
        "Cython/pure is always a speed-up (pure time / Cython time).",
        "",
        "| case | backend | median round | per message | msg/s | GB/s | × C floor | × pyzmq | Cython/pure |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in sorted(cases, key=case_order):
        rows = cases[case]
        c = rows.get("c")
        z = rows.get("zmq")
        py, cy = rows.get("machipc-py"), rows.get("machipc-c")
        for backend in sorted(rows, key=lambda b: ORDER.index(b) if b in ORDER else 99):
            r = rows[backend]
            per = f"{r.per_msg_us:.2f} µs" if r.per_msg_us < 1000 else f"{r.per_msg_us / 1000:.2f} ms"
            gb = f"{r.gb_per_s:.3f}" if r.size >= 1024 else "–"
            vs_c = ratio(metric(r), metric(c)) if c and backend != "c" else "–"
            vs_z = ratio(metric(r), metric(z)) if z and backend != "zmq" else "–"
            speed = ratio(py.median / py.messages, cy.median / cy.messages) if backend == "machipc-c" and py and cy else "–"
            label = NAMES.get(backend, backend)
            if backend == "zmq":
                label += " REQ/REP" if "rtt" in case else " PUSH/PULL"
            med = f"{r.median * 1000:.2f} ms ({r.messages} msgs)"
            out.append(f"| {case} | {label} | {med} | {per} | {fmt_rate(r.msg_per_s)} | {gb} | {vs_c} | {vs_z} | {speed} |")
    return out


def targets(cases: dict[str, dict[str, Row]]) -> list[str]:
    """Issue 7's targets, judged on this run."""
    out = ["| target | measured | met? |", "| --- | --- | --- |"]

    def line(text, value, ok):
        out.append(f"| {text} | {value} | {'yes' if ok else '**no**'} |")

    rtt, one = cases.get("rtt 64 B, same CPU", {}), cases.get("one-way 64 B", {})
    for impl in ("machipc-c", "machipc-py"):
        for label, rows in (("same CPU", rtt), ("cross-CPU", cases.get("rtt 64 B, cross-CPU", {}))):
            m = rows.get(impl)
            if m and "c" in rows:
                x = m.per_msg_us / rows["c"].per_msg_us
                line(f"{NAMES[impl]}: RTT ({label}) ≤ 1.10× C floor", f"{m.per_msg_us:.1f} µs vs {rows['c'].per_msg_us:.1f} µs = {x:.2f}×", x <= 1.10)
            if m and "zmq" in rows:
                x = m.per_msg_us / rows["zmq"].per_msg_us
                line(f"{NAMES[impl]}: RTT ({label}) ≤ 0.5× pyzmq REQ/REP", f"{m.per_msg_us:.1f} µs vs {rows['zmq'].per_msg_us:.1f} µs = {x:.2f}×", x <= 0.5)
        m = one.get(impl)
        if m and "c" in one:
            x = m.msg_per_s / one["c"].msg_per_s
            line(f"{NAMES[impl]}: one-way ≥ 0.8× C floor msg/s", f"{fmt_rate(m.msg_per_s)} vs {fmt_rate(one['c'].msg_per_s)} msg/s = {x:.2f}×", x >= 0.8)
    for kind in ("rtt 64 B, same CPU", "one-way 64 B"):
        for impl in ("machipc-c", "machipc-py"):
            a = cases.get(f"policy {kind} (allowall)", {}).get(impl)
            u = cases.get(f"policy {kind} (sameuser)", {}).get(impl)
            if a and u:
                x = u.cost() / a.cost()
                out.append(f"| (info) cost of trust, {NAMES[impl]}, {kind}: SameUser / AllowAll time | {x:.2f}× | – |")
    # Issue 6: large payloads and batching.
    for size in ("1 MiB", "16 MiB", "64 MiB"):
        rows = cases.get(f"payload {size}", {})
        m = rows.get("machipc-c")
        if m and "zmq" in rows:
            x = m.gb_per_s / rows["zmq"].gb_per_s
            line(f"machipc (Cython) {size} ≥ 2× pyzmq", f"{m.gb_per_s:.2f} vs {rows['zmq'].gb_per_s:.2f} GB/s = {x:.2f}×", x >= 2.0)
        if m and "memcpy" in rows:
            x = m.gb_per_s / rows["memcpy"].gb_per_s
            line(f"machipc (Cython) {size} ≥ 0.25× memcpy", f"{m.gb_per_s:.2f} vs {rows['memcpy'].gb_per_s:.2f} GB/s = {x:.2f}×", x >= 0.25)
    batched = cases.get("one-way batched 64 B (x32)", {}).get("machipc-c")
    if batched and "zmq" in one:
        x = batched.msg_per_s / one["zmq"].msg_per_s
        line("machipc (Cython) batched 64 B ≥ 1.5× pyzmq PUSH/PULL", f"{fmt_rate(batched.msg_per_s)} vs {fmt_rate(one['zmq'].msg_per_s)} msg/s = {x:.2f}×", x >= 1.5)
    for case, rows in (("rtt 64 B, same CPU", rtt), ("one-way 64 B", one)):
        py, cy = rows.get("machipc-py"), rows.get("machipc-c")
        if py and cy:
            x = py.median / cy.median
            line(f"Cython ≥ 2× pure ({case})", f"{x:.2f}×", x >= 2.0)
    return out


# --------------------------------------------------------------------------- plots


def plots(cases: dict[str, dict[str, Row]], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(ORDER, ["#bbbbbb", "#222222", "#888888", "#1f77b4", "#9467bd", "#d62728", "#ff7f0e", "#2ca02c"]))
    made = []

    # 1. latency by case: per-message time of the request/reply cases, grouped bars.
    lat_cases = [c for c in sorted(cases, key=case_order) if "rtt" in c]
    if lat_cases:
        backends = [b for b in ORDER if any(b in cases[c] for c in lat_cases)]
        fig, ax = plt.subplots(figsize=(11, 0.55 * len(lat_cases) * len(backends) / 2.5 + 2))
        h = 0.8 / len(backends)
        for i, b in enumerate(backends):
            ys, xs = [], []
            for j, c in enumerate(lat_cases):
                if b in cases[c]:
                    ys.append(j + i * h)
                    xs.append(cases[c][b].per_msg_us)
            ax.barh(ys, xs, height=h, color=colors.get(b), label=NAMES.get(b, b))
            for y, x in zip(ys, xs):
                ax.text(x * 1.03, y, f"{x:.1f}", va="center", fontsize=7)
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(lat_cases))])
        ax.set_yticklabels([c.replace(" rtt 64 B", ",\nserver on own CPU") if "client" in c else c for c in lat_cases])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("µs per request (round trip; many clients: wall time / total requests) — lower is better, log scale")
        ax.set_title(f"machipc request/reply latency by case\n{title}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        path = out / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)

    # 2. throughput by payload size (log-log), one line per backend.
    pay = {c: rows for c, rows in cases.items() if c.startswith("payload") or c == "one-way 64 B"}
    if pay:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for b in ORDER:
            pts = sorted((r.size, r.gb_per_s) for rows in pay.values() for bb, r in rows.items() if bb == b)
            if len(pts) < 1:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", color=colors.get(b), label=NAMES.get(b, b), linestyle="--" if b.startswith("c") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = [64, 1024, 64 * 1024, 1024**2, 16 * 1024**2, 64 * 1024**2]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["64 B", "1 KiB", "64 KiB", "1 MiB", "16 MiB", "64 MiB"])
        ax.set_xlabel("payload size per message (log scale)")
        ax.set_ylabel("GB/s delivered to the receiver (log scale)")
        ax.set_title(f"one-way throughput by payload size\n{title}", fontsize=10)
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)

    # 3. message rate of the 64-byte one-way and many-client cases.
    rate_cases = [c for c in sorted(cases, key=case_order) if c.startswith(("one-way", "policy one-way")) or "client" in c]
    if rate_cases:
        backends = [b for b in ORDER if any(b in cases[c] for c in rate_cases)]
        fig, ax = plt.subplots(figsize=(11, 0.5 * len(rate_cases) * len(backends) / 2.5 + 2))
        h = 0.8 / len(backends)
        for i, b in enumerate(backends):
            ys, xs = [], []
            for j, c in enumerate(rate_cases):
                if b in cases[c]:
                    ys.append(j + i * h)
                    xs.append(cases[c][b].msg_per_s)
            ax.barh(ys, xs, height=h, color=colors.get(b), label=NAMES.get(b, b))
            for y, x in zip(ys, xs):
                ax.text(x * 1.03, y, fmt_rate(x), va="center", fontsize=7)
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(rate_cases))])
        ax.set_yticklabels(rate_cases)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("messages per second — higher is better, log scale")
        ax.set_title(f"64-byte message rate\n{title}", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", which="both", alpha=0.3)
        fig.tight_layout()
        path = out / "msgrate.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path.name)
    return made


def machine(doc: dict) -> str:
    mi = doc.get("machine_info", {})
    cpu = mi.get("cpu", {})
    bits = [
        mi.get("node", "?"),
        cpu.get("brand_raw") or mi.get("processor") or "?",
        f"{cpu.get('count', '?')} cores",
        f"{mi.get('system', '')} {mi.get('release', '')}".strip(),
        f"Python {mi.get('python_version', '?')}",
    ]
    commit = doc.get("commit_info", {})
    if commit.get("id"):
        bits.append(f"commit {commit['id'][:8]}{'+dirty' if commit.get('dirty') else ''}")
    return ", ".join(bits) + f"; run {doc.get('datetime', '?')[:19]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    path = args.json
    if path is None:
        found = sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            print("no results in bench/results/: run make bench-quick first", file=sys.stderr)
            return 1
        path = found[-1]
    doc, cases = load(path)
    if not cases:
        print(f"{path}: no benchmark cases", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    where = machine(doc)
    quick = any(b.get("extra_info", {}).get("quick") for b in doc["benchmarks"])
    made = plots(cases, args.out, where.split(";")[0])
    lines = [
        "# machipc benchmark results",
        "",
        f"From `{path.name}` ({'quick run: few messages per round' if quick else 'full run'}) — {where}.",
        "",
        "Each backend runs its server and client in separate processes; each round moves a fixed number of",
        "messages and ends with a check that every one arrived in order from the right pid. Medians of the",
        "rounds; ratios only between backends of this run. `make bench` regenerates this file.",
        "",
        "## Targets (issue 7, issue 3)",
        "",
        *targets(cases),
        "",
        "## All cases",
        "",
        *table(cases),
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in made],
        "",
    ]
    out = args.out / "latest.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {', '.join(made)} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
