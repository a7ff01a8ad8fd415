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

ORDER = ["memcpy", "c", "c-pidfd", "c-nopidfd", "socket", "mpconn", "zmq", "machipc-py", "machipc-c"]
NAMES = {
    "memcpy": "memcpy (one process)",
    "c": "C floor",
    "c-pidfd": "C floor, pidfd per packet",
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
        cpu = info.get("server_cpu_ns_per_msg")
        #: the server process's CPU µs per message (median round), None where not measured
        self.server_cpu_us: float | None = None if cpu is None else cpu / 1000

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


def load(path: Path) -> tuple[dict, dict[str, dict[str, Row]], dict[str, float]]:
    """The run's document, its cases ({case: {backend: Row}}) and the rejected-packet
    costs of test_rejected.py ({"rejected 64 B, c": µs of server CPU per packet, ...})."""
    doc = json.loads(path.read_text())
    cases: dict[str, dict[str, Row]] = defaultdict(dict)
    rejected: dict[str, float] = {}
    for bench in doc["benchmarks"]:
        info = bench.get("extra_info", {})
        if "rejected" in info:
            rejected[info["rejected"]] = info["cpu_us_per_rejected_packet"]
        if "case" not in info:
            continue
        row = Row(bench)
        cases[row.case][row.backend] = row
    return doc, cases, rejected


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


def fmt_us(x: float) -> str:
    return f"{x:.2f} µs" if x < 1000 else f"{x / 1000:.2f} ms"


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
        "Server CPU: CPU time of the whole server process per message (all threads, user + system),",
        "median round; a server that keeps up with its sender wakes more often and pays more per message.",
        "",
        "| case | backend | median round | per message | msg/s | GB/s | server CPU / msg | × C floor | × pyzmq | Cython/pure |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in sorted(cases, key=case_order):
        rows = cases[case]
        c = rows.get("c")
        z = rows.get("zmq")
        py, cy = rows.get("machipc-py"), rows.get("machipc-c")
        for backend in sorted(rows, key=lambda b: ORDER.index(b) if b in ORDER else 99):
            r = rows[backend]
            per = fmt_us(r.per_msg_us)
            gb = f"{r.gb_per_s:.3f}" if r.size >= 1024 else "–"
            vs_c = ratio(metric(r), metric(c)) if c and backend != "c" else "–"
            vs_z = ratio(metric(r), metric(z)) if z and backend != "zmq" else "–"
            speed = ratio(py.median / py.messages, cy.median / cy.messages) if backend == "machipc-c" and py and cy else "–"
            label = NAMES.get(backend, backend)
            if backend == "zmq":
                label += " REQ/REP" if "rtt" in case else " PUSH/PULL"
            med = f"{r.median * 1000:.2f} ms ({r.messages} msgs)"
            cpu = "–" if r.server_cpu_us is None else fmt_us(r.server_cpu_us)
            out.append(f"| {case} | {label} | {med} | {per} | {fmt_rate(r.msg_per_s)} | {gb} | {cpu} | {vs_c} | {vs_z} | {speed} |")
    return out


def targets(cases: dict[str, dict[str, Row]], rejected: dict[str, float]) -> list[str]:
    """Issue 16's targets (then earlier issues' that still hold), judged on this run,
    for machipc's Cython transport; the pure twin is in the table."""
    out = ["| target | measured | met? |", "| --- | --- | --- |"]

    def line(text, value, ok):
        out.append(f"| {text} | {value} | {'yes' if ok else '**no**'} |")

    def info(text, value):
        out.append(f"| (info) {text} | {value} | – |")

    def context(rows: dict[str, Row], value, fmt: str) -> str:
        """``value`` of the other C floor variants, pyzmq and the pure twin, for the measured column."""
        bits = [f"{NAMES[b]} {fmt.format(value(rows[b]))}" for b in ("c-pidfd", "c-nopidfd", "zmq", "machipc-py")
                if b in rows and value(rows[b]) is not None]
        return f"; {', '.join(bits)}" if bits else ""

    rtt, one = cases.get("rtt 64 B, same CPU", {}), cases.get("one-way 64 B", {})
    cy = "machipc-c"
    m, c = one.get(cy), one.get("c")
    if m and c:
        x = m.msg_per_s / c.msg_per_s
        line("one-way 64 B under `serve()` ≥ 0.8× C floor msg/s",
             f"{fmt_rate(m.msg_per_s)} vs {fmt_rate(c.msg_per_s)} msg/s = {x:.2f}×{context(one, lambda r: r.msg_per_s, '{:,.0f}')}",
             x >= 0.8)
    if m and m.server_cpu_us is not None:
        vs = f" vs C floor {c.server_cpu_us:.2f} µs = {m.server_cpu_us / c.server_cpu_us:.2f}×" if c and c.server_cpu_us else ""
        line("server CPU per one-way 64 B message ≤ 1.5 µs",
             f"{m.server_cpu_us:.2f} µs{vs}{context(one, lambda r: r.server_cpu_us, '{:.2f} µs')}", m.server_cpu_us <= 1.5)
    for label, rows, limit in (("across CPUs", cases.get("rtt 64 B, cross-CPU", {}), 1.2), ("on one CPU", rtt, 2.0)):
        m, c = rows.get(cy), rows.get("c")
        if m and c:
            x = m.per_msg_us / c.per_msg_us
            line(f"request/reply 64 B {label} ≤ {limit}× C floor", f"{m.per_msg_us:.1f} µs vs {c.per_msg_us:.1f} µs = {x:.2f}×", x <= limit)
    z = one.get("zmq")
    m = cases.get("one-way batched 64 B (x32)", {}).get(cy)
    if m and z:
        x = m.msg_per_s / z.msg_per_s
        line("batched 64 B (`send_many` + `receive_many`) ≥ 1.5× pyzmq PUSH/PULL",
             f"{fmt_rate(m.msg_per_s)} vs {fmt_rate(z.msg_per_s)} msg/s = {x:.2f}×", x >= 1.5)
    m = cases.get("one-way batched 64 B (x32), serve()", {}).get(cy)
    if m and z:
        info("batched 64 B, `send_many` + `serve()`, vs pyzmq PUSH/PULL",
             f"{fmt_rate(m.msg_per_s)} vs {fmt_rate(z.msg_per_s)} msg/s = {m.msg_per_s / z.msg_per_s:.2f}×")
    small = rejected.get("rejected 64 B, c")
    if small is not None:
        pure = rejected.get("rejected 64 B, py")
        line("rejected 64 B packet, cached decision: ≤ 2 µs server CPU",
             f"{small:.2f} µs" + (f" (pure twin {pure:.2f} µs)" if pure is not None else ""), small <= 2.0)
    for size in ("1 MiB", "16 MiB"):
        rows = cases.get(f"payload {size}", {})
        m = rows.get(cy)
        if m and "zmq" in rows:
            x = m.gb_per_s / rows["zmq"].gb_per_s
            line(f"{size} payload ≥ 2× pyzmq", f"{m.gb_per_s:.2f} vs {rows['zmq'].gb_per_s:.2f} GB/s = {x:.2f}×", x >= 2.0)
    for case, rows in (("rtt 64 B, same CPU", rtt), ("one-way 64 B", one)):
        py, c = rows.get("machipc-py"), rows.get(cy)
        if py and c:
            x = py.median / c.median
            line(f"Cython ≥ 2× pure twin ({case})", f"{x:.2f}×", x >= 2.0)

    # Earlier issues' targets that still hold (issue 7: round trips; issue 6: large payloads;
    # issue 12: a rejected payload's size costs nothing).
    for label, rows in (("on one CPU", rtt), ("across CPUs", cases.get("rtt 64 B, cross-CPU", {}))):
        m = rows.get(cy)
        if m and "zmq" in rows:
            x = m.per_msg_us / rows["zmq"].per_msg_us
            line(f"(issue 7) RTT {label} ≤ 0.5× pyzmq REQ/REP", f"{m.per_msg_us:.1f} µs vs {rows['zmq'].per_msg_us:.1f} µs = {x:.2f}×", x <= 0.5)
    for size in ("1 MiB", "16 MiB", "64 MiB"):
        rows = cases.get(f"payload {size}", {})
        m = rows.get(cy)
        if m and "zmq" in rows and size == "64 MiB":
            x = m.gb_per_s / rows["zmq"].gb_per_s
            line(f"(issue 6) {size} payload ≥ 2× pyzmq", f"{m.gb_per_s:.2f} vs {rows['zmq'].gb_per_s:.2f} GB/s = {x:.2f}×", x >= 2.0)
        if m and "memcpy" in rows:
            x = m.gb_per_s / rows["memcpy"].gb_per_s
            line(f"(issue 6) {size} payload ≥ 0.25× memcpy", f"{m.gb_per_s:.2f} vs {rows['memcpy'].gb_per_s:.2f} GB/s = {x:.2f}×", x >= 0.25)
    for impl in ("c", "py"):
        small, big = rejected.get(f"rejected 64 B, {impl}"), rejected.get(f"rejected 64 MiB, {impl}")
        if small and big is not None:
            line(f"(issue 12) {NAMES['machipc-' + impl]}: rejected 64 MiB payload no dearer than 64 B (≤ 1.1×)",
                 f"{big:.2f} vs {small:.2f} µs = {big / small:.2f}×", big <= small * 1.1)
    for kind in ("rtt 64 B, same CPU", "one-way 64 B"):
        for impl in ("machipc-c", "machipc-py"):
            a = cases.get(f"policy {kind} (allowall)", {}).get(impl)
            u = cases.get(f"policy {kind} (sameuser)", {}).get(impl)
            if a and u:
                info(f"cost of trust, {NAMES[impl]}, {kind}: SameUser / AllowAll time", f"{u.cost() / a.cost():.2f}×")
    return out


# --------------------------------------------------------------------------- plots


def plots(cases: dict[str, dict[str, Row]], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(ORDER, ["#bbbbbb", "#222222", "#555555", "#888888", "#1f77b4", "#9467bd", "#d62728", "#ff7f0e", "#2ca02c"]))
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
    doc, cases, rejected = load(path)
    if not cases and not rejected:
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
        "## Targets (issue 16; then earlier issues' that still hold)",
        "",
        *targets(cases, rejected),
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
    print(f"wrote {out}{' and ' + ', '.join(made) if made else ''} from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
