"""The results page (`--report`): saved benchmark and batch runs as one self-contained HTML page.

For each model and load setting, the latest run on each GPU (the runs `--bench` ranks) is
drawn twice: $ per million output tokens against p99 TTFT, and against p99 TPOT, one point
per GPU, the latency targets of the last ranking as lines and the cheapest GPU that meets
them marked, as `--bench` ranks them (`bench.rank`, `bench.cheapest`). The table behind the
charts holds every figure the runs saved. Batch runs (`--batch`) show tokens, throughput and
estimated cost per model.

Runs are read defensively: an older run lacks fields that newer ones have (the actual GPU,
the router hop, the cost split, the targets), and shows "not recorded" there; a run that
failed requests is drawn and listed as such; a file of ours that cannot be read is listed on
the page with the reason. Nothing is dropped silently.

plotly draws the charts. It is imported here only, only when a page is written, and the page
carries plotly.js inline (no CDN): it opens anywhere, with no network. Colours follow the
browser's light or dark theme (`prefers-color-scheme`): CSS variables for the page, and the
charts re-coloured from them when the theme changes.
"""

from __future__ import annotations

import html
import json
import os
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import bench
import config

REPORT_NAME = "report.html"  # written inside the results folder unless -o says otherwise
BATCH_KIND = "modal-vllm-batch"
LOAD_LABELS = {"concurrency": "{} in flight", "requests": "{} requests",
               "input_len": "{} words in", "output_len": "{} tokens out"}
# Marker colours that read on both the light and the dark background (the page's own colours
# are CSS variables; these are the few fixed ones).
MEETS, MISSES, FAILED, CHEAPEST, TARGET = "#3b82f6", "#8b949e", "#e5534b", "#f2a900", "#d4762c"


# ## Reading the saved runs


@dataclass
class Runs:
    bench: list[dict] = field(default_factory=list)
    batch: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why it is not shown)


def _lacks(data: dict, paths: tuple[str, ...]) -> str | None:
    """The first dotted path that `data` does not have as a non-list value, or None."""
    for path in paths:
        node = data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return path
            node = node[part]
    return None


BENCH_NEEDS = ("model", "gpu", "started_at", "settings", "usd_per_million_output_tokens",
               "metrics.completed", "metrics.failed", "metrics.output_throughput",
               "metrics.ttft_ms.p99", "metrics.tpot_ms.p99")
BATCH_NEEDS = ("started_at", "models")


def load_runs(results_dir: Path) -> Runs:
    """Every saved bench and batch run under `results_dir` (other JSON files are not ours)."""
    runs = Runs()
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            runs.skipped.append((path.name, f"cannot be read: {exc}"))
            continue
        except ValueError as exc:
            runs.skipped.append((path.name, f"is not valid JSON: {exc}"))
            continue
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind not in (bench.RESULT_KIND, BATCH_KIND):
            continue
        lacking = _lacks(data, BENCH_NEEDS if kind == bench.RESULT_KIND else BATCH_NEEDS)
        if lacking is None and kind == BATCH_KIND and not isinstance(data["models"], dict):
            lacking = "models (an object)"
        if lacking is None and kind == bench.RESULT_KIND and not isinstance(
                data["settings"], dict):
            lacking = "settings (an object)"
        if lacking is not None:
            runs.skipped.append((path.name, f"a saved {kind} run without {lacking}"))
            continue
        data = {**data, "file": str(path)}
        (runs.bench if kind == bench.RESULT_KIND else runs.batch).append(data)
    return runs


# ## Bench runs by model and load: the latest per GPU, ranked as --bench ranks them


@dataclass
class Group:
    model: str
    settings: dict
    runs: list[dict]  # the latest run on each GPU, in the ranking's order
    rows: list[dict]  # bench.rank's row for each of them, same order
    earlier: list[dict]  # older runs on the same GPUs under this load, newest first
    targets: dict | None  # the last ranking's {"max_ttft_ms", "max_tpot_ms"}; None: not recorded
    best: dict | None  # the cheapest row that meets them

    @property
    def anchor(self) -> str:
        load = "-".join(str(self.settings.get(k, "x")) for k in LOAD_LABELS)
        return _slug(f"{self.model}-{load}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _target(targets: dict | None, key: str) -> float | None:
    value = (targets or {}).get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def group_bench_runs(runs: list[dict]) -> list[Group]:
    by_load: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        key = (str(run["model"]), json.dumps(run["settings"], sort_keys=True))
        by_load.setdefault(key, []).append(run)
    groups = []
    def load_order(key):  # by model, then by load as numbers (1 in flight before 16)
        settings = json.loads(key[1])
        return key[0], [(str(type(settings[k])), settings[k]) for k in sorted(settings)]

    for (model, _), members in sorted(by_load.items(), key=lambda item: load_order(item[0])):
        members.sort(key=lambda r: str(r["started_at"]), reverse=True)  # newest first
        latest: dict[str, dict] = {}
        earlier = []
        for run in members:
            if run["gpu"] in latest:
                earlier.append(run)
            else:
                latest[run["gpu"]] = run
        # The last ranking is the one --bench printed after the newest run of this group; runs
        # saved before the targets were recorded leave them unknown.
        newest = members[0]
        targets = newest.get("targets") if isinstance(newest.get("targets"), dict) else None
        rows = bench.rank(list(latest.values()), max_ttft_ms=_target(targets, "max_ttft_ms"),
                          max_tpot_ms=_target(targets, "max_tpot_ms"))
        by_file = {run["file"]: run for run in latest.values()}
        groups.append(Group(model, members[0]["settings"], [by_file[r["file"]] for r in rows],
                            rows, earlier, targets, bench.cheapest(rows)))
    return groups


# ## Formatting: every value may be missing in an older run


def _num(value, digits: int = 0, unit: str = "") -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "–"
    return f"{value:,.{digits}f}{unit}"


def _money(value, digits: int = 2) -> str:
    return "–" if not isinstance(value, int | float) else f"${value:,.{digits}f}"


def _when(stamp) -> str:
    try:
        moment = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M") + (" UTC" if moment.tzinfo else "")


def _stats(stats) -> str:
    if not isinstance(stats, dict):
        return "–"
    return " / ".join(_num(stats.get(q), 1 if _small(stats.get(q)) else 0)
                      for q in ("mean", "p50", "p99"))


def _small(value) -> bool:
    return isinstance(value, int | float) and abs(value) < 10


def load_label(settings: dict) -> str:
    parts = [label.format(settings[k]) for k, label in LOAD_LABELS.items() if k in settings]
    parts += [f"{k} {v}" for k, v in settings.items() if k not in LOAD_LABELS]
    return " · ".join(parts) or "load not recorded"


def _actual_gpu(run: dict) -> str:
    if "gpu_actual" not in run:
        return "not recorded (older run)"
    actual = run["gpu_actual"]
    if not isinstance(actual, dict):
        return "not reported"
    text = str(actual.get("name") or "?")
    if actual.get("count"):
        text += f" ×{actual['count']}"
    extras = [f"driver {actual['driver']}" if actual.get("driver") else "",
              f"vLLM {actual['vllm']}" if actual.get("vllm") else ""]
    return ", ".join([text, *filter(None, extras)])


def _per_hour(run: dict) -> str:
    text = _money(run.get("usd_per_hour")) + "/h"
    split = run.get("usd_per_hour_split")
    if isinstance(split, dict):
        text += " (" + ", ".join(f"{part} {_money(split.get(part), 3)}"
                                 for part in ("gpu", "cpu", "memory") if part in split) + ")"
    elif run.get("usd_per_hour") is not None:
        text += " (GPUs only: saved before CPU and memory were priced)"
    return text


def _misses(row: dict) -> str:
    return "; ".join(row["misses"]) or "met"


def _targets_text(targets: dict | None) -> str:
    if targets is None:
        return "the last ranking's latency targets were not recorded (a run saved before they were)"
    shown = [f"TTFT p99 ≤ {_target(targets, 'max_ttft_ms'):g} ms"
             if _target(targets, "max_ttft_ms") is not None else "",
             f"TPOT p99 ≤ {_target(targets, 'max_tpot_ms'):g} ms"
             if _target(targets, "max_tpot_ms") is not None else ""]
    shown = [s for s in shown if s]
    return ("targets of the last ranking: " + " and ".join(shown) if shown
            else "the last ranking set no latency target")


# ## Charts (plotly figures, rendered in the page by plotly.js)


def _cost_figure(group: Group, metric: str) -> tuple[dict, list[str]]:
    """$ per million output tokens against the p99 of `metric` (ttft or tpot): the figure as
    plotly JSON, and the GPUs that could not be drawn (no latency or no cost), with why."""
    import plotly.graph_objects as go

    label = metric.upper()
    target = _target(group.targets, f"max_{metric}_ms")
    best = group.best and group.best["file"]
    kinds = {"cheapest": [], "meets": [], "misses": [], "failed": []}
    unplotted = []
    for run, row in zip(group.runs, group.rows, strict=True):
        x, y = row[f"{metric}_p99_ms"], row["usd_per_million_output_tokens"]
        failed = run["metrics"]["failed"]
        if x is None or y is None:
            unplotted.append(f"{run['gpu']} ({run['metrics']['completed']} completed, "
                             f"{failed} failed: no {'latency' if x is None else 'cost'})")
            continue
        kind = ("cheapest" if row["file"] == best else "failed" if failed
                else "meets" if row["meets_targets"] else "misses")
        text = run["gpu"] + (f" · {failed} failed" if failed else "")
        hover = (f"{run.get('gpu_string', run['gpu'])} asked; ran on {_actual_gpu(run)}<br>"
                 f"{_when(run['started_at'])} · {_misses(row)}")
        kinds[kind].append((x, y, text, hover))
    names = {"cheapest": "cheapest meeting the targets" if group.targets else "cheapest",
             "meets": "meets the targets" if group.targets else "no failed request",
             "misses": "misses a target", "failed": "failed requests"}
    markers = {"cheapest": {"symbol": "star", "size": 20, "color": CHEAPEST,
                            "line": {"width": 1, "color": "#7a5500"}},
               "meets": {"symbol": "circle", "size": 12, "color": MEETS},
               "misses": {"symbol": "circle-open", "size": 12, "color": MISSES,
                          "line": {"width": 2}},
               "failed": {"symbol": "x", "size": 13, "color": FAILED}}
    # Neighbours along x take turns above and below their points, so labels rarely collide.
    order = sorted((p[0], p[1]) for points in kinds.values() for p in points)
    place = {xy: ("top center", "bottom center")[n % 2] for n, xy in enumerate(order)}
    fig = go.Figure()
    for kind, points in kinds.items():
        if not points:
            continue
        xs, ys, texts, hovers = zip(*points, strict=True)
        fig.add_trace(go.Scatter(
            x=list(xs), y=list(ys), text=list(texts), customdata=list(hovers),
            name=names[kind], mode="markers+text",
            textposition=[place[(x, y)] for x, y in zip(xs, ys, strict=True)],
            marker=markers[kind], cliponaxis=False,
            hovertemplate=(f"<b>%{{text}}</b><br>p99 {label} %{{x:,.0f}} ms<br>"
                           "$%{y:,.2f} per million output tokens<br>%{customdata}"
                           "<extra></extra>")))
    if target is not None:
        fig.add_vline(x=target, line={"dash": "dash", "color": TARGET, "width": 2},
                      annotation={"text": f"target ≤ {target:g} ms", "font": {"color": TARGET},
                                  "xanchor": "left", "yanchor": "bottom"},
                      annotation_position="bottom right")
    fig.update_layout(
        title={"text": f"$ per million output tokens vs p99 {label}", "x": 0.01,
               "font": {"size": 14}},
        height=380, margin={"l": 64, "r": 24, "t": 44, "b": 48},
        paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
        font={"family": "system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif",
              "size": 12},
        legend={"orientation": "h", "y": -0.2, "x": 0}, showlegend=True,
        xaxis={"title": {"text": f"p99 {label} (ms)"}, "rangemode": "tozero",
               "zeroline": False},
        yaxis={"title": {"text": "$ / M output tokens"}, "rangemode": "tozero",
               "tickprefix": "$", "zeroline": False},
        hoverlabel={"align": "left"})
    return fig.to_plotly_json(), unplotted


def _batch_figure(runs: list[dict]) -> dict:
    """Output tokens per second per model of each batch run, the estimated cost as its label."""
    import plotly.graph_objects as go

    ys, xs, texts, colours = [], [], [], []
    for run in runs:
        for model, m in run["models"].items():
            m = m if isinstance(m, dict) else {}
            ys.append(f"{model} · {Path(str(run.get('input', '?'))).name} · "
                      f"{_when(run['started_at'])}")
            xs.append(m.get("output_tokens_per_s") or 0)
            failed = m.get("requests_failed") or 0
            cost = m.get("usd_estimate")
            texts.append((f"{_money(cost)} est." if isinstance(cost, int | float) else "no cost")
                         + (f" · {failed} failed" if failed else ""))
            colours.append(FAILED if failed else MEETS)
    fig = go.Figure(go.Bar(x=xs, y=ys, text=texts, orientation="h", marker={"color": colours},
                           textposition="auto", cliponaxis=False, name="output tokens/s",
                           hovertemplate="%{y}<br>%{x:,.0f} output tokens/s<br>%{text}"
                                         "<extra></extra>"))
    fig.update_layout(
        title={"text": "Batch runs: output tokens per second per model", "x": 0.01,
               "font": {"size": 14}},
        height=120 + 34 * len(ys), margin={"l": 24, "r": 24, "t": 44, "b": 48},
        paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(0,0,0,0)",
        font={"family": "system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif",
              "size": 12},
        xaxis={"title": {"text": "output tokens/s"}, "rangemode": "tozero"},
        yaxis={"automargin": True, "autorange": "reversed"})
    return fig.to_plotly_json()


# ## The page


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _chart(chart_id: str, figure: dict) -> str:
    """A chart's place and its figure as JSON; the page's script draws it."""
    import plotly.io

    spec = plotly.io.to_json(figure, validate=False).replace("</", "<\\/")
    return (f'<div class="chart"><div id="{chart_id}" class="plot"></div>'
            f'<script type="application/json" data-chart="{chart_id}">{spec}</script></div>')


def _bench_table(group: Group) -> str:
    runs, rows = group.runs, group.rows
    best = group.best and group.best["file"]
    has_hop = any("hop_ms" in run for run in runs)
    head = "".join(f'<th scope="col">{n}. {_e(run["gpu"])}</th>'
                   for n, run in enumerate(runs, 1))
    table_rows = [
        ("verdict", [("cheapest meeting the targets" if group.targets else "cheapest")
                     if row["file"] == best else _misses(row) for row in rows],
         ["good" if row["file"] == best else "" if row["meets_targets"] else "bad"
          for row in rows]),
        ("GPU asked", [f"{run.get('gpu_string', run['gpu'])} ({run.get('gpus_per_replica', '?')}"
                       " per replica)" for run in runs], None),
        ("GPU it ran on", [_actual_gpu(run) for run in runs], None),
        ("run started", [_when(run["started_at"]) for run in runs], None),
        ("$ per M output tokens", [_money(run["usd_per_million_output_tokens"])
                                   for run in runs], None),
        ("$ per hour per replica", [_per_hour(run) for run in runs], None),
        ("replicas", [_num(run.get("replicas")) if "replicas" in run
                      else "not recorded (older run)" for run in runs], None),
        ("requests completed", [_num(run["metrics"]["completed"]) for run in runs], None),
        ("requests failed", [_num(run["metrics"]["failed"]) for run in runs],
         ["bad" if run["metrics"]["failed"] else "" for run in runs]),
        ("errors", ["; ".join(map(str, run["metrics"].get("errors") or [])) or "none"
                    for run in runs], ["bad wrap" if run["metrics"].get("errors") else ""
                                       for run in runs]),
        ("wall time (s)", [_num(run["metrics"].get("duration_s"), 2) for run in runs], None),
        ("requests/s", [_num(run["metrics"].get("request_throughput"), 2) for run in runs],
         None),
        ("output tokens/s", [_num(run["metrics"]["output_throughput"], 1) for run in runs],
         None),
        ("input / output tokens", [f"{_num(run['metrics'].get('total_input_tokens'))} / "
                                   f"{_num(run['metrics'].get('total_output_tokens'))}"
                                   for run in runs], None),
        *((f"{label} ms mean / p50 / p99", [_stats(run["metrics"].get(key)) for run in runs],
           None) for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"),
                                    ("ITL", "itl_ms"), ("E2EL", "e2el_ms"))),
        *([("router→pool hop ms mean / p50 / p99",
            [_stats(run["hop_ms"]) if run.get("hop_ms") else
             "not measured" if "hop_ms" in run else "not recorded (older run)"
             for run in runs], None)] if has_hop else []),
        ("wake-up before the run (s)", [_num(run.get("cold_start_s"), 1) for run in runs],
         None),
        ("endpoint", [f"{run.get('app', '')} {run.get('endpoint', '')}".strip() or "–"
                      for run in runs], ["wrap"] * len(runs)),
        ("cost assumes", [str(run.get("cost_assumption", "not recorded")) for run in runs],
         ["wrap small"] * len(runs)),
        ("saved as", [Path(run["file"]).name for run in runs], ["small"] * len(runs)),
    ]
    body = []
    for label, cells, classes in table_rows:
        classes = classes or [""] * len(cells)
        body.append(f'<tr><th scope="row">{_e(label)}</th>' + "".join(
            f'<td class="{c}">{_e(v)}</td>' if c else f"<td>{_e(v)}</td>"
            for v, c in zip(cells, classes, strict=True)) + "</tr>")
    return (f'<div class="table-wrap"><table id="{group.anchor}-table" class="runs">'
            f'<thead><tr><th scope="col">latest run per GPU</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _earlier_table(group: Group) -> str:
    if not group.earlier:
        return ""
    rows = "".join(
        f"<tr><td>{_e(run['gpu'])}</td><td>{_e(_when(run['started_at']))}</td>"
        f"<td>{_money(run['usd_per_million_output_tokens'])}</td>"
        f"<td>{_num(run['metrics']['ttft_ms']['p99'])}</td>"
        f"<td>{_num(run['metrics']['tpot_ms']['p99'])}</td>"
        f"<td{' class=bad' if run['metrics']['failed'] else ''}>"
        f"{_num(run['metrics']['completed'])} / {_num(run['metrics']['failed'])}</td>"
        f"<td class=small>{_e(Path(run['file']).name)}</td></tr>"
        for run in group.earlier)
    return (f"<details><summary>{len(group.earlier)} earlier run(s) under this load (the "
            "charts show the latest run per GPU)</summary><div class=table-wrap>"
            f'<table id="{group.anchor}-earlier"><thead><tr><th>GPU</th><th>started</th>'
            "<th>$ / M out</th><th>TTFT p99 ms</th><th>TPOT p99 ms</th>"
            f"<th>completed / failed</th><th>file</th></tr></thead><tbody>{rows}</tbody>"
            "</table></div></details>")


def _bench_section(group: Group) -> str:
    charts, notes = [], []
    for metric in ("ttft", "tpot"):
        figure, unplotted = _cost_figure(group, metric)
        if len(unplotted) < len(group.runs):
            charts.append(_chart(f"{group.anchor}-{metric}", figure))
        if unplotted and metric == "ttft":
            notes.append(("Nothing to draw" if not charts else "Not drawn") + " (the table "
                         "shows every figure): " + "; ".join(unplotted) + ".")
    failed = [run["gpu"] for run in group.runs if run["metrics"]["failed"]]
    if failed:
        notes.append(f"Failed requests on {', '.join(failed)}: such a run never counts as "
                     "meeting the targets.")
    if group.best:
        verdict = (f"Cheapest {'meeting the targets' if group.targets else 'without failures'}: "
                   f"<strong>{_e(group.best['gpu'])}</strong> at "
                   f"{_money(group.best['usd_per_million_output_tokens'])} per million output "
                   "tokens.")
    else:
        verdict = ('<strong class="bad">No GPU meets the targets.</strong>' if group.targets
                   else '<strong class="bad">No GPU ran without failed requests.</strong>')
    return (f'<section id="{group.anchor}" class="group"><h2>{_e(group.model)} '
            f'<span class="load">{_e(load_label(group.settings))}</span></h2>'
            f"<p>{verdict} <span class=muted>{len(group.runs)} GPU(s); "
            f"{_e(_targets_text(group.targets))}.</span></p>"
            + (f'<div class="charts">{"".join(charts)}</div>' if charts else "")
            + "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
            + _bench_table(group) + _earlier_table(group) + "</section>")


def _batch_section(runs: list[dict]) -> str:
    if not runs:
        return ""
    runs = sorted(runs, key=lambda r: str(r["started_at"]), reverse=True)
    parts = [(f'<section id="batch" class="group"><h2>Batch runs <span class="load">'
             f"{len(runs)} run(s), newest first</span></h2>"),
             f'<div class="charts one">{_chart("batch-throughput", _batch_figure(runs))}</div>']
    columns = ("model", "requests ok", "failed", "prompt tokens", "completion tokens",
               "wall (s)", "requests/s", "output tokens/s", "replicas seen",
               "estimated cost (basis)")
    for n, run in enumerate(runs, 1):
        where = run.get("app") or run.get("endpoint") or "?"
        rows = []
        models = [(k, v if isinstance(v, dict) else {}) for k, v in run["models"].items()]
        totals = run.get("totals")
        if isinstance(totals, dict):
            models.append(("total", totals))
        for model, m in models:
            failed = m.get("requests_failed") or 0
            cost = m.get("usd_estimate")
            cells = [model, _num(m.get("requests_ok")), _num(m.get("requests_failed")),
                     _num(m.get("prompt_tokens")), _num(m.get("completion_tokens")),
                     _num(m.get("wall_s"), 1), _num(m.get("requests_per_s"), 2),
                     _num(m.get("output_tokens_per_s"), 1), _num(m.get("replicas_seen")),
                     f"{_money(cost)} (estimate)" if isinstance(cost, int | float) else "none"]
            basis = m.get("cost_basis")
            rows.append("<tr" + (' class="total"' if model == "total" else "") + ">" + "".join(
                f'<td class="{"bad" if i == 2 and failed else ""}">{_e(v)}</td>'
                for i, v in enumerate(cells[:-1]))
                + f'<td class="wrap">{_e(cells[-1])}'
                + (f'<br><span class="small">{_e(basis)}</span>' if basis else "")
                + "</td></tr>")
        failed_total = sum((m.get("requests_failed") or 0) for k, m in models if k != "total")
        head = (f"<h3>{_e(Path(str(run.get('input', '?'))).name)} on {_e(where)} "
                f"<span class=muted>{_e(_when(run['started_at']))}</span></h3>"
                f"<p class=muted>{_num(run.get('wall_s'), 1)} s wall · GPU "
                f"{_e(run.get('gpu') or 'not named (--base-url)')} · output "
                f"{_e(run.get('output', '?'))}"
                + (f' · <span class="bad">{failed_total} failed request(s), in '
                   f"{_e(run.get('errors', 'the errors file'))}</span>" if failed_total else "")
                + " · costs are estimates" + "</p>")
        parts.append(f'{head}<div class="table-wrap"><table id="batch-{n}-table" class="batch">'
                     "<thead><tr>"
                     + "".join(f"<th>{_e(c)}</th>" for c in columns)
                     + f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    parts.append("</section>")
    return "".join(parts)


STYLE = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1f2328; --muted: #59636e;
  --grid: #d8dee4; --card: #f6f8fa; --border: #d1d9e0; --bad: #cf222e; --good: #1a7f37; }
@media (prefers-color-scheme: dark) { :root { --bg: #0d1117; --fg: #e6edf3; --muted: #9198a1;
  --grid: #30363d; --card: #151b23; --border: #3d444d; --bad: #ff7b72; --good: #3fb950; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 12px 20px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 0 0 4px; }
h3 { font-size: 15px; margin: 20px 0 4px; }
.load, .muted, .note { color: var(--muted); font-weight: normal; }
.load { font-size: 14px; margin-left: 8px; }
.group { border-top: 1px solid var(--border); padding-top: 16px; margin-top: 24px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr));
  gap: 16px; margin: 12px 0; }
.charts.one { grid-template-columns: 1fr; }
.chart { min-width: 0; border: 1px solid var(--border); border-radius: 6px;
  background: var(--card); padding: 4px; }
.table-wrap { overflow-x: auto; margin: 8px 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--border); text-align: right;
  vertical-align: top; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid var(--border); }
tbody th { font-weight: 600; color: var(--muted); position: sticky; left: 0;
  background: var(--bg); }
td.wrap { white-space: normal; min-width: 12em; max-width: 24em; text-align: left; }
table.runs, table.batch { width: 100%; }
table.runs td, table.batch td { white-space: normal; overflow-wrap: anywhere; }
table.runs td { min-width: 8em; }
.small { font-size: 12px; color: var(--muted); }
.bad { color: var(--bad); font-weight: 600; } .good { color: var(--good); font-weight: 600; }
tr.total td { font-weight: 600; border-top: 2px solid var(--border); }
nav ul { margin: 4px 0; padding-left: 20px; } a { color: inherit; }
details { margin: 8px 0; } summary { cursor: pointer; color: var(--muted); }
"""

# Draws every chart from its JSON, colours the charts from the page's CSS variables (again
# whenever the browser's theme changes), then marks the page ready (the browser test waits
# for data-ready).
SCRIPT = """
(function () {
  const config = {displaylogo: false, displayModeBar: false, responsive: true};
  const scheme = window.matchMedia("(prefers-color-scheme: dark)");
  function theme() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return {"font.color": v("--fg"), "legend.font.color": v("--fg"),
            "xaxis.gridcolor": v("--grid"), "yaxis.gridcolor": v("--grid"),
            "xaxis.linecolor": v("--muted"), "yaxis.linecolor": v("--muted"),
            "hoverlabel.bgcolor": v("--card"), "hoverlabel.font.color": v("--fg"),
            "hoverlabel.bordercolor": v("--border")};
  }
  const specs = Array.from(document.querySelectorAll("script[data-chart]"));
  const drawn = specs.map((spec) => {
    const figure = JSON.parse(spec.textContent);
    Object.assign(figure.layout, {autosize: true});
    return Plotly.newPlot(spec.dataset.chart, figure.data, figure.layout, config);
  });
  function recolour() {
    const colours = theme();
    return Promise.all(specs.map((spec) => Plotly.relayout(spec.dataset.chart, colours)));
  }
  Promise.all(drawn).then(recolour).then(() => { document.body.dataset.ready = "true"; });
  scheme.addEventListener("change", recolour);
})();
"""


def render(runs: Runs, *, source: str, generated_at: datetime | None = None) -> str:
    """The whole page as one string: styles, plotly.js and the data inline."""
    from plotly.offline import get_plotlyjs

    generated_at = generated_at or datetime.now(UTC)
    groups = group_bench_runs(runs.bench)
    failed = sum(1 for run in runs.bench if run["metrics"]["failed"])
    summary = (f"{len(runs.bench)} benchmark run(s)"
               + (f" ({failed} with failed requests)" if failed else "")
               + f" and {len(runs.batch)} batch run(s) saved in {source}; written "
               f"{generated_at.astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC')} by "
               "deploy.py --report.")
    nav = "".join(f'<li><a href="#{g.anchor}">{_e(g.model)}</a> '
                  f'<span class="muted">{_e(load_label(g.settings))}</span></li>'
                  for g in groups)
    if runs.batch:
        nav += '<li><a href="#batch">Batch runs</a></li>'
    skipped = ""
    if runs.skipped:
        skipped = ('<section id="skipped" class="group"><h2>Files not shown</h2><ul>'
                   + "".join(f"<li>{_e(name)} {_e(why)}</li>" for name, why in runs.skipped)
                   + "</ul></section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        "<title>modal-vllm results</title>"
        f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body><main>"
        "<h1>modal-vllm results</h1>"
        f'<p class="muted">{_e(summary)} Costs are the replicas the load needs at '
        "models.yaml's prices (GPUs, CPU and memory; runs saved before the CPU and memory were "
        "priced: GPUs only), busy for the run's wall time (each run's own assumption is in its "
        "table); batch costs are estimates.</p>"
        f"<nav><ul>{nav}</ul></nav>"
        + "".join(_bench_section(g) for g in groups)
        + _batch_section(runs.batch) + skipped
        + f"</main><script>{SCRIPT}</script></body></html>\n")


# ## Writing it: `--report`, and after every --bench / --batch run


class Written(NamedTuple):
    path: Path | None  # None: written to stdout
    runs: Runs


def write_report(results_dir: Path, output: Path | str) -> Written:
    """Write the page from the runs under `results_dir` to `output` ('-': stdout)."""
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    if not runs.bench and not runs.batch:
        raise config.UserError(f"no saved runs in {results_dir}/ to report on: run --bench or "
                               "--batch first (or point --results-dir at their folder)")
    page = render(runs, source=f"{results_dir}/")
    if str(output) == "-":
        sys.stdout.write(page)
        return Written(None, runs)
    path = Path(output)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # one per writer
    try:
        # Whole or not at all: a browser reloading the page never sees half of it.
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise config.UserError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return Written(path, runs)


def report_command(results_dir: Path, output: Path | str | None) -> None:
    """`deploy.py --report [-o PATH] [--results-dir DIR]`."""
    from rich.console import Console
    from rich.markup import escape

    results_dir = Path(results_dir)
    written = write_report(results_dir, output or results_dir / REPORT_NAME)
    if written.path is None:
        return
    runs = written.runs
    console = Console(stderr=False, highlight=False, emoji=False)
    groups = group_bench_runs(runs.bench)
    console.print(f"Wrote {escape(str(written.path))}: {len(groups)} chart pair(s) from "
                  f"{len(runs.bench)} benchmark run(s), {len(runs.batch)} batch run(s)"
                  + (f"; {len(runs.skipped)} file(s) not readable, listed on the page"
                     if runs.skipped else ""), soft_wrap=True)
    console.print(f"Open it in a browser: {written.path.resolve().as_uri()}", soft_wrap=True)


class Update(NamedTuple):
    path: Path | None  # the page, or None when it could not be written
    line: str  # one line to end the run with: where the page is, or why it was not updated


def update_after_run(results_dir: Path) -> Update:
    """Rewrite `results_dir`/report.html after a --bench or --batch run saved its result there.

    The run is saved and its exit code stands whatever happens here: a page that cannot be
    written is one line saying why, not an error.
    """
    path = Path(results_dir) / REPORT_NAME
    try:
        write_report(results_dir, path)
    except (config.UserError, OSError, ImportError) as exc:
        return Update(None, f"Report      not updated: {exc}")
    return Update(path, f"Report      {path} updated (deploy.py --report; open it in a browser)")
