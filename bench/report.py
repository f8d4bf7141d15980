"""The benchmark's one table, and the same numbers as JSON.  [pure]

A `Row` holds one measure for each column (direct, balancer, haproxy, floor),
`None` where it does not apply or was not measured; `render_table` formats
values by the row's `Kind` and adds the ratios: balancer / direct, haproxy /
direct, balancer / haproxy and balancer / floor.  `floor` is the cheapest
uvloop relay that inserts a fixed cookie (`bench.floor`): lb/floor is how much
of the balancer's cost is its own work rather than the runtime's.  A row with
`ratio_base` compares its balancer value with that instead of direct (the
workers 1 vs 2 rows).  A row measured in interleaved rounds carries its
lb/haproxy and lb/floor ratios as the median of the per-round ratios
(`paired_haproxy`, `paired_floor`): rounds next to each other in time share the
machine's state, so a pair is a fairer comparison than two medians taken from
different rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

MISSING = "-"


class Kind(StrEnum):
    RATE = "rate"        # per second, a count
    MBPS = "MB/s"        # megabytes (10^6) per second
    CPU_US = "cpu_us"    # CPU seconds, shown in µs
    CPU_MS = "cpu_ms"    # CPU seconds, shown in ms
    KIB = "KiB"          # kibibytes


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    kind: Kind
    direct: float | None = None
    balancer: float | None = None
    haproxy: float | None = None
    ratio_base: float | None = None  # if set, the balancer ratio is balancer / ratio_base
    floor: float | None = None
    paired_haproxy: float | None = None  # if set, lb/haproxy: the median of per-round ratios
    paired_floor: float | None = None  # if set, lb/floor, likewise


def format_value(kind: Kind, value: float | None) -> str:
    """`12,345`, `123.4`, `23.1 µs`, `1.25 ms`, `5.2 KiB`; `-` for None."""
    if value is None:
        return MISSING
    if kind is Kind.RATE:
        return f"{value:,.0f}"
    if kind is Kind.MBPS:
        return f"{value:,.1f}"
    if kind is Kind.CPU_US:
        micro = value * 1e6
        return f"{micro:,.1f} µs" if micro < 100 else f"{micro:,.0f} µs"
    if kind is Kind.CPU_MS:
        return f"{value * 1e3:,.2f} ms"
    return f"{value:,.1f} KiB"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None if either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def format_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def row_ratios(row: Row) -> tuple[float | None, float | None, float | None]:
    """(balancer / direct-or-base, haproxy / direct, balancer / haproxy)."""
    base = row.ratio_base if row.ratio_base is not None else row.direct
    lb_haproxy = row.paired_haproxy if row.paired_haproxy is not None else ratio(row.balancer, row.haproxy)
    return ratio(row.balancer, base), ratio(row.haproxy, row.direct), lb_haproxy


def lb_floor_ratio(row: Row) -> float | None:
    """balancer / floor: >1 is the balancer's own work on top of the cheapest relay."""
    return row.paired_floor if row.paired_floor is not None else ratio(row.balancer, row.floor)


def render_table(rows: Sequence[Row], *, haproxy: bool, floor: bool = False) -> str:
    """The plain-text table; the HAProxy columns only when `haproxy`, the floor ones only when `floor`."""
    header = ["scenario", "direct", "balancer", "ratio"]
    if haproxy:
        header += ["haproxy", "ratio", "lb/haproxy"]
    if floor:
        header += ["floor", "lb/floor"]
    table: list[list[str]] = [header]
    for row in rows:
        lb_ratio, ha_ratio, lb_ha = row_ratios(row)
        cells = [
            row.label,
            format_value(row.kind, row.direct),
            format_value(row.kind, row.balancer),
            format_ratio(lb_ratio),
        ]
        if haproxy:
            cells += [format_value(row.kind, row.haproxy), format_ratio(ha_ratio), format_ratio(lb_ha)]
        if floor:
            cells += [format_value(row.kind, row.floor), format_ratio(lb_floor_ratio(row))]
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for line in table:
        parts = [line[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(line) if i > 0]
        lines.append("   ".join(parts).rstrip())
    return "\n".join(lines)


def to_document(header: dict[str, Any], rows: Sequence[Row], notes: Sequence[str], raw: Any) -> dict[str, Any]:
    """The JSON written by `--json FILE`: header, rows with their ratios, notes, raw results."""
    out_rows = []
    for row in rows:
        lb_ratio, ha_ratio, lb_ha = row_ratios(row)
        out_rows.append(
            {**asdict(row), "kind": row.kind.value, "ratio_balancer": lb_ratio, "ratio_haproxy": ha_ratio,
             "ratio_lb_haproxy": lb_ha, "ratio_lb_floor": lb_floor_ratio(row)}
        )
    return {"header": header, "rows": out_rows, "notes": list(notes), "raw": raw}
