"""`shardline status`: a running cluster's STATS reply as rich tables.

Two tables: the workers (placement, liveness, memory, step time, busy fraction, price) and the
cluster (queues, KV cache, recent throughput, token counters, cost). Every number comes from one
STATS_REPLY (docs/protocol.md); nothing is computed here except unit formatting.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _num(x: float | None, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if x is None else fmt.format(x)


def worker_table(stats: dict) -> Table:
    """One row per registered worker."""
    t = Table(title="Workers", title_justify="left")
    for col, right in (("worker", False), ("host", False), ("stage", True), ("layers", False), ("tp", True),
                       ("state", False), ("heartbeat", True), ("RSS", True), ("KV pool", True), ("last step", True),
                       ("steps", True), ("busy", True), ("price/h", True)):
        t.add_column(col, justify="right" if right else "left", no_wrap=True)
    for w in stats.get("workers", []):
        layers = "-" if w.get("layer_start") is None else f"[{w['layer_start']}, {w['layer_end']})"
        state = ("drained" if w.get("drained") else "lost") if not w["alive"] else ("ready" if w["ready"] else "loading")
        t.add_row(w["worker_id"], w["host"], _num(w.get("stage"), "{}"), layers, _num(w.get("tp_rank"), "{}"),
                  state, f"{w['heartbeat_age_s']:.1f} s", _bytes(w.get("rss_bytes")), _bytes(w.get("kv_bytes")),
                  f"{w['step_time_s'] * 1000:.1f} ms", str(w.get("num_steps", "-")),
                  _num(w.get("busy_fraction"), "{:.0%}"), _num(w.get("price_per_hour")))
    return t


def cluster_table(stats: dict) -> Table:
    """Queues, KV cache, throughput, counters and cost, one per row."""
    t = Table(title="Cluster", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("state", str(stats.get("state", "-")))
    if stats.get("worker_drain"):
        d = stats["worker_drain"]
        t.add_row("draining worker", f"{d['worker_id']} ({d['phase']}, {d['elapsed_s']:.1f} s)")
    if stats.get("num_requests_running") is not None:  # None before the first plan
        t.add_row("requests running / waiting", f"{stats['num_requests_running']} / {stats['num_requests_waiting']}")
        t.add_row("steps in flight", str(stats["num_steps_in_flight"]))
        used = stats["num_kv_blocks"] - stats["num_free_blocks"]
        t.add_row("KV cache", f"{used} / {stats['num_kv_blocks']} blocks ({stats['kv_cache_usage']:.1%})")
        t.add_row("preemptions", str(stats["num_preemptions_total"]))
    window = stats.get("throughput_window_s")
    t.add_row(f"generated tokens/s (last {window:g} s)" if window else "generated tokens/s",
              _num(stats.get("generation_tokens_per_s"), "{:.1f}"))
    t.add_row("requests finished / accepted", f"{stats.get('requests_finished', 0)} / {stats.get('requests_total', 0)}")
    t.add_row("prompt / generated tokens", f"{stats.get('prompt_tokens_total', 0)} / "
                                           f"{stats.get('generation_tokens_total', 0)}")
    t.add_row("price per hour (workers alive)", _num(stats.get("price_per_hour")))
    t.add_row("cost per 1M generated tokens (since start)", _num(stats.get("cost_per_million_tokens"), "{:.4f}"))
    t.add_row("cost per 1M generated tokens (recent)", _num(stats.get("recent_cost_per_million_tokens"), "{:.4f}"))
    return t


def render(stats: dict) -> Group:
    """Both tables, for `Console.print`."""
    return Group(worker_table(stats), cluster_table(stats))


def print_status(stats: dict, console: Console | None = None) -> None:
    """Print both tables; when stdout is not a terminal, lines are not cut at 80 columns."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
    console.print(render(stats))
