"""`--report`: the results page from saved runs (tests/report_runs.py: made by bench's own
build_result and save_result, figures worked out by hand there), the CLI around it, the line
that ends every --bench run, the import cost to other commands, and the page itself in a real
headless Chromium: no console error, no request but the page, every chart and table with the
right points, readable in light and dark, not broken at 800 px."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import report_runs
from browser import Browser, find_chromium
from report_runs import CHEAPEST, COST, GPU_ACTUAL_H100, TARGETS
from standin import StandIn
from test_bench import KEY, gateway_before  # the same one-model gateway as --bench's tests
from typer.testing import CliRunner

import deploy
import report

ROOT = Path(__file__).resolve().parent.parent
RANKED = ["h200", "b200", "a100", "h100", "l40s"]  # report_runs' table: meets first, by cost


def invoke(*args):
    return CliRunner().invoke(deploy.cli, list(args), env={"COLUMNS": "200"})


@pytest.fixture
def results(matrix, tmp_path):
    return report_runs.write_runs(matrix, tmp_path / "results")


# ## Reading and ranking the saved runs


def test_runs_are_grouped_by_load_and_ranked_as_bench_ranks_them(results):
    runs = report.load_runs(results)
    assert len(runs.bench) == 7 and len(runs.batch) == 2
    assert runs.skipped == [
        ("gemma-3-12b-l40s-broken.json",
         ("is not valid JSON: Expecting ',' delimiter: line 1 column 28 (char 27)")),
        ("gemma-3-12b-l40s-edited.json", "a saved modal-vllm-bench run without started_at")]
    one, sixteen = report.group_bench_runs(runs.bench)  # 1 in flight before 16
    assert (one.settings["concurrency"], sixteen.settings["concurrency"]) == (1, 16)
    assert [r["gpu"] for r in sixteen.runs] == RANKED
    assert {r["gpu"]: r["usd_per_million_output_tokens"] for r in sixteen.runs} == COST
    # The newest run's targets are the last ranking's; under them h200 is the cheapest that
    # meets them (a100 is cheaper, but failed requests; l40s and h100 miss TTFT).
    assert sixteen.targets == TARGETS and sixteen.best["gpu"] == CHEAPEST
    assert [r["meets_targets"] for r in sixteen.rows] == [True, True, False, False, False]
    assert [(r["gpu"], r["started_at"][:10]) for r in sixteen.earlier] == [("h100", "2026-11-01")]
    assert [r["gpu"] for r in one.runs] == ["h100"] and one.best is None
    assert one.runs[0]["metrics"]["completed"] == 0  # every request failed: shown, not dropped


def test_an_old_run_without_the_targets_leaves_them_unknown(matrix, tmp_path):
    report_runs.save_run(matrix, tmp_path, "h100", "2026-06-01T09:00:00.000+00:00", 0.3, 0.015,
                         1.0, 0)
    (group,) = report.group_bench_runs(report.load_runs(tmp_path).bench)
    assert group.targets is None and group.best["gpu"] == "h100"
    assert "targets were not recorded" in report._targets_text(group.targets)


# ## The page and the command


def test_report_writes_one_self_contained_page(results):
    out = invoke("--report", "--results-dir", str(results))
    assert out.exit_code == 0, out.output
    page_path = results / "report.html"
    lines = out.stdout.splitlines()
    assert lines == [
        (f"Wrote {page_path}: 2 chart pair(s) from 7 benchmark run(s), 2 batch run(s); 2 "
        "file(s) not readable, listed on the page"),
        f"Open it in a browser: {page_path.resolve().as_uri()}"]
    page = page_path.read_text()
    # Nothing to fetch: no external script, style sheet, font or image; plotly.js is inline.
    assert not re.search(r"<(script|img|iframe)[^>]+src=|<link|@import", page)
    assert page.count("<script") == 1 + 3 + 1  # plotly.js, 3 chart specs, the page's own
    for run in report.load_runs(results).bench:  # every run is on the page, by its file
        assert Path(run["file"]).name in page
    assert "NVIDIA H200 ×1, driver 580.95.05, vLLM 0.33.0" in page  # h100 asked, H200 ran
    assert "not recorded (older run)" in page and "not reported" in page
    assert "$4.25/h (gpu $3.950, cpu $0.189, memory $0.112)" in page
    assert "$4.54/h (GPUs only: saved before CPU and memory were priced)" in page  # h200
    assert "HTTP 503: the server is starting" in page
    assert "Nothing to draw (the table shows every figure): h100 (0 completed, 4 failed: no " \
           "latency)." in page
    assert "$0.57 (estimate)" in page and "12 failed request(s)" in page
    assert "gemma-3-12b-l40s-broken.json is not valid JSON" in page


def test_no_saved_runs_is_one_line_and_exit_1(tmp_path):
    for folder in (tmp_path, tmp_path / "missing"):
        out = invoke("--report", "--results-dir", str(folder))
        assert out.exit_code == 1
        assert out.stderr.strip() == (f"Error: no saved runs in {folder}/ to report on: run "
                                      "--bench or --batch first (or point --results-dir at "
                                      "their folder)")
    assert not (tmp_path / "report.html").exists()


def test_output_goes_where_asked(results, tmp_path):
    out = invoke("--report", "--results-dir", str(results), "-o", str(tmp_path / "mine.html"))
    assert out.exit_code == 0, out.output
    assert (tmp_path / "mine.html").read_text().startswith("<!DOCTYPE html>")
    assert not (results / "report.html").exists()
    out = invoke("--report", "--results-dir", str(results), "-o", "-")
    assert out.exit_code == 0 and out.stdout.startswith("<!DOCTYPE html>")
    out = invoke("--report", "--results-dir", str(results), "-o", str(tmp_path / "no" / "x.html"))
    assert out.exit_code == 1
    assert re.fullmatch(r"Error: \S+x\.html: cannot write: No such file or directory\n",
                        out.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["--report", "--json"], "--json goes with"),
    (["--report", "--workspace", "w"], "--workspace goes with --litellm-config, not --report"),
    (["--list", "-o", "x"], "--output goes with --litellm-config, --batch or --report, not --list"),
    (["--list", "--results-dir", "x"], "--results-dir goes with --bench, --batch or --report, not --list"),
])
def test_what_goes_with_report(args, message):
    out = invoke(*args)
    assert out.exit_code == 2 and message in out.stderr, out.output


# ## Other commands pay nothing for it


def imported(*args) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "deploy.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", proc.stderr, re.MULTILINE))


@pytest.mark.parametrize("args", [["--list"], ["--help"], ["--all", "--dry-run"]])
def test_other_commands_never_import_the_chart_library(args):
    modules = imported(*args)
    assert modules, "no import recorded"
    assert not {"report", "plotly", "narwhals"} & {m.split(".")[0] for m in modules}


def test_report_itself_imports_it(results):
    modules = imported("--report", "--results-dir", str(results))
    assert {"report", "plotly"} <= {m.split(".")[0] for m in modules}


# ## Every --bench run ends with the page


def run_bench(url, results, *args):
    return invoke("--bench", "h100", "--test-model", "gemma-3-12b", "--base-url", url,
                  "--api-key", KEY, "--requests", "4", "--concurrency", "2", "--input-len", "8",
                  "--output-len", "3", "--results-dir", str(results), *args)


def test_bench_ends_with_the_updated_page_and_saves_its_targets(matrix, tmp_path):
    with gateway_before(matrix, StandIn(["google/gemma-3-12b-it"])) as url:
        table = run_bench(url, tmp_path, "--max-ttft-ms", "5000")
        as_json = run_bench(url, tmp_path, "--json", "--max-tpot-ms", "900")
    assert table.exit_code == 0, table.output
    page = tmp_path / "report.html"
    assert table.stdout.splitlines()[-1] == (f"Report      {page} updated (deploy.py --report; "
                                             "open it in a browser)")
    assert as_json.exit_code == 0, as_json.output
    out = json.loads(as_json.stdout)  # stdout is still one JSON document; the line is on stderr
    assert as_json.stderr.splitlines()[-1].startswith(f"Report      {page} updated")
    assert out["result"]["targets"] == {"max_ttft_ms": None, "max_tpot_ms": 900.0}
    saved = sorted(tmp_path.glob("gemma-3-12b-h100-*.json"),
                   key=lambda p: json.loads(p.read_text())["started_at"])
    assert [json.loads(p.read_text())["targets"] for p in saved] == [
        {"max_ttft_ms": 5000.0, "max_tpot_ms": None}, {"max_ttft_ms": None, "max_tpot_ms": 900.0}]
    text = page.read_text()
    assert all(p.name in text for p in saved)
    assert "targets of the last ranking: TPOT p99 ≤ 900 ms" in text


def test_a_page_that_cannot_be_written_does_not_fail_the_run(matrix, tmp_path):
    (tmp_path / "report.html").mkdir()  # in the way
    with gateway_before(matrix, StandIn(["google/gemma-3-12b-it"])) as url:
        out = run_bench(url, tmp_path)
    assert out.exit_code == 0, out.output
    assert re.fullmatch(r"Report {6}not updated: \S+report\.html: cannot write: .+",
                        out.stdout.splitlines()[-1])
    assert len(list(tmp_path.glob("gemma-3-12b-h100-*.json"))) == 1
    assert report.update_after_run(tmp_path).path is None


# ## In a real browser


CHROMIUM = find_chromium()

READ_PAGE = """(() => {
  const charts = {};
  for (const gd of document.querySelectorAll(".js-plotly-plot")) {
    charts[gd.id] = {
      traces: gd.data.map((t) => ({name: t.name, type: t.type, x: Array.from(t.x),
                                   y: Array.from(t.y), text: Array.from(t.text)})),
      lines: (gd.layout.shapes || []).map((s) => ({x0: s.x0, x1: s.x1})),
      drawn: gd.querySelectorAll(".scatterlayer .point, .barlayer .point").length,
      font: gd._fullLayout.font.color, width: gd.getBoundingClientRect().width};
  }
  const tables = {};
  for (const table of document.querySelectorAll("table[id]")) {
    tables[table.id] = Array.from(table.rows).map(
      (row) => Array.from(row.cells).map((cell) => cell.textContent.trim()));
  }
  const css = getComputedStyle(document.documentElement);
  return {charts, tables, fg: css.getPropertyValue("--fg").trim(),
          bg: getComputedStyle(document.body).backgroundColor,
          notes: Array.from(document.querySelectorAll(".note")).map((n) => n.textContent),
          scrollWidth: document.documentElement.scrollWidth};
})()"""


def _luminance(css_colour: str) -> float:
    r, g, b = (int(v) for v in re.findall(r"\d+", css_colour)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


def _rgb(hex_colour: str) -> str:
    h = hex_colour.lstrip("#")
    return "rgb({}, {}, {})".format(*(int(h[i:i + 2], 16) for i in (0, 2, 4)))


def points(chart: dict) -> dict[str, list[tuple]]:
    return {t["name"]: list(zip(t["x"], t["y"], t["text"], strict=True)) for t in chart["traces"]}


async def _browse(url: str, shots: Path) -> dict:
    async with Browser(CHROMIUM) as browser:
        await browser.open(url, width=1280)
        light = await browser.evaluate(READ_PAGE)
        await browser.screenshot(shots / "report-light.png")
        await browser.viewport(1280, dark=True)  # the theme changes under an open page
        await browser.evaluate("new Promise((ok) => setTimeout(ok, 300))")
        dark_live = await browser.evaluate(READ_PAGE)
        await browser.open(url, width=1280, dark=True)
        dark = await browser.evaluate(READ_PAGE)
        await browser.screenshot(shots / "report-dark.png")
        await browser.open(url, width=800)
        narrow = await browser.evaluate(READ_PAGE)
        await browser.screenshot(shots / "report-800px.png")
        return {"light": light, "dark_live": dark_live, "dark": dark, "narrow": narrow,
                "errors": browser.console_errors(), "requests": browser.requests()}


def test_the_page_in_headless_chromium(results):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing on CI: .ci/run installs Debian's chromium")
        pytest.skip("Chromium is missing: apt-get install -y chromium")
    invoke("--report", "--results-dir", str(results))
    page = results / "report.html"
    seen = asyncio.run(_browse(page.as_uri(), ROOT / "results"))

    assert seen["errors"] == []
    assert set(seen["requests"]) == {page.as_uri()}  # the page itself, three loads, nothing else

    light = seen["light"]
    sixteen = "gemma-3-12b-16-128-1024-128"
    assert set(light["charts"]) == {f"{sixteen}-ttft", f"{sixteen}-tpot", "batch-throughput"}
    ttft, tpot = light["charts"][f"{sixteen}-ttft"], light["charts"][f"{sixteen}-tpot"]
    # One point per GPU at (p99 latency, $ per million output tokens), by the ranking's kind.
    assert points(ttft) == {
        "cheapest meeting the targets": [(200, COST["h200"], "h200")],
        "meets the targets": [(120, COST["b200"], "b200")],
        "misses a target": [(300, COST["h100"], "h100"), (900, COST["l40s"], "l40s")],
        "failed requests": [(500, COST["a100"], "a100 · 2 failed")]}
    assert {k: [(x, text) for x, _, text in v] for k, v in points(tpot).items()} == {
        "cheapest meeting the targets": [(12, "h200")], "meets the targets": [(10, "b200")],
        "misses a target": [(15, "h100"), (40, "l40s")],
        "failed requests": [(20, "a100 · 2 failed")]}
    assert ttft["lines"] == [{"x0": 250, "x1": 250}] and tpot["lines"] == [{"x0": 30, "x1": 30}]
    assert ttft["drawn"] == tpot["drawn"] == 5  # SVG points on screen, one per GPU
    (batch,) = light["charts"]["batch-throughput"]["traces"]
    assert batch["x"] == [750, 480, 750, 480]  # newest run first, a bar per model
    assert batch["text"] == ["no cost · 12 failed", "no cost", "$0.57 est.", "$0.28 est."]
    assert light["charts"]["batch-throughput"]["drawn"] == 4

    table = {row[0]: row[1:] for row in light["tables"][f"{sixteen}-table"]}
    assert table["latest run per GPU"] == [f"{n}. {gpu}" for n, gpu in enumerate(RANKED, 1)]
    assert table["verdict"][:2] == ["cheapest meeting the targets", "met"]
    assert table["verdict"][2] == "2 failed; TTFT p99 500 ms > 250 ms"
    assert table["requests failed"] == ["0", "0", "2", "0", "0"]
    assert table["$ per M output tokens"] == ["$0.99", "$1.07", "$0.76", "$1.15", "$1.22"]
    assert table["GPU it ran on"] == ["not recorded (older run)", "not reported",
                                      "not recorded (older run)",
                                      "NVIDIA H200 ×1, driver 580.95.05, vLLM 0.33.0",
                                      "not recorded (older run)"]
    assert table["run started"][0] == "2026-06-01 09:00 UTC"
    assert table["TTFT ms mean / p50 / p99"][0] == "200 / 200 / 200"
    assert GPU_ACTUAL_H100["name"] in table["GPU it ran on"][RANKED.index("h100")]
    one = "gemma-3-12b-1-4-1024-128"
    assert {row[0]: row[1:] for row in light["tables"][f"{one}-table"]}["requests failed"] == [
        "4"]
    assert any(n.startswith("Nothing to draw") and "h100 (0 completed, 4 failed" in n
               for n in light["notes"])
    earlier = light["tables"][f"{sixteen}-earlier"]
    assert len(earlier) == 2 and earlier[1][:2] == ["h100", "2026-11-01 09:00 UTC"]
    batch_newest = light["tables"]["batch-1-table"]
    assert [row[:3] for row in batch_newest[1:]] == [
        ["gemma-3-12b", "900", "12"], ["qwen3-vl-30b", "1,000", "0"], ["total", "1,900", "12"]]

    # Light and dark: page and chart text take the theme's colours, also when the theme
    # changes with the page open; both read (dark text on light, light text on dark).
    for name, state in (("light", light), ("dark", seen["dark"]),
                        ("dark_live", seen["dark_live"])):
        for chart in state["charts"].values():
            assert _rgb(chart["font"]) == _rgb(state["fg"]) if chart["font"].startswith(
                "#") else chart["font"] == state["fg"], name
    assert _luminance(light["bg"]) > 0.9 and _luminance(_rgb(light["fg"])) < 0.3
    assert _luminance(seen["dark"]["bg"]) < 0.1 and _luminance(_rgb(seen["dark"]["fg"])) > 0.8
    assert seen["dark_live"]["fg"] == seen["dark"]["fg"] != light["fg"]

    # 800 px: nothing wider than the window (wide tables scroll inside their own box).
    narrow = seen["narrow"]
    assert narrow["scrollWidth"] <= 800
    assert all(0 < chart["width"] <= 800 for chart in narrow["charts"].values())
    assert all(chart["width"] < 640 for name, chart in light["charts"].items()
               if name != "batch-throughput")  # at 1280 px the two charts stand side by side
    for shot in ("report-light.png", "report-dark.png", "report-800px.png"):
        assert (ROOT / "results" / shot).stat().st_size > 10_000
