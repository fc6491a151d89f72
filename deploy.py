"""modal-vllm: deploy OpenAI-compatible vLLM endpoints to Modal, one per GPU type.

The command line only: parse flags, call one function, print the result, map
errors to exit codes. `--list`, `--dry-run` and `--help` never import modal.
"""

# No `from __future__ import annotations` here: typer would eval every option's
# annotation string (re-building its typer.Option) several times per run, ~7 ms.

import json
import shlex
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import typer

import command_line
import config
import fast_options

# The help's epilog: every line fits an 80-column terminal (a test checks), so that none
# wraps mid-example.
EXAMPLES = """
[bold]Examples[/bold]

  uv run deploy.py --list                   models x GPUs: fits, prices
  uv run deploy.py --all --dry-run          what would be deployed, offline
  uv run deploy.py --gpu h100               deploy vllm-h100 (every model)
  uv run deploy.py --test-gpu h100          conformance suite against it
  uv run deploy.py --status                 what is deployed and running
  uv run deploy.py --stop all               stop every app (asks first)
  uv run deploy.py --url h100 --format env  LLM_BASE_URL=, LLM_API_KEY= lines
  uv run deploy.py --litellm-config         litellm_config.yaml for the proxy
  uv run deploy.py --batch h100 --input f.jsonl  requests from a file
  export LLM_BASE_URL=$(uv run deploy.py --url h100)/v1
  uv run deploy.py --report                 saved runs as one HTML page

[bold]Exit codes[/bold]
  0 ok                               5 Modal unreachable
  1 failed                           6 Modal Secret or LoRA adapter missing
  2 usage error                      7 limit reached (endpoints, quota)
  3 invalid models.yaml              8 build or deploy failed
  4 not authenticated with Modal     9 the local gateway cannot listen
  130 --batch stopped with Ctrl-C (run it again to resume)
"""

MATRIX = "Matrix"
DEPLOY = "Deploy (GPU-based: one endpoint per GPU type)"
LEGACY = "Legacy (one endpoint per model x GPU)"
OUTPUT = "Output and configuration"
OPERATE = "Operate deployed apps"
LOCAL = "Local gateway"
TEST = "Test and benchmark"
ADAPTERS = "LoRA adapters"
EXPORT = "Export"
BATCH = "Batch runs"

cli = typer.Typer(
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


fast_options.install()  # before any option is parsed: see fast_options.py


def _console(stderr: bool = False):
    from rich.console import Console

    # emoji=False: no ":name:" codes here, and their table costs ~15 ms to import.
    return Console(stderr=stderr, highlight=False, soft_wrap=False, emoji=False)


def _fail(exc: config.UserError) -> typer.Exit:
    command_line.print_error(str(exc))  # one problem, one line, as click's usage errors
    return typer.Exit(code=exc.exit_code)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# ## --list


def matrix_data(matrix: config.Matrix) -> dict:
    import plan

    gpu_apps = plan.all_gpu_apps(matrix)
    legacy = matrix.legacy_cells()
    limit = config.STARTER_PLAN_ENDPOINT_LIMIT
    return {
        "config": str(matrix.path),
        "gpus": {
            g.key: {"modal_gpu": g.modal_gpu, "vram_gb": g.vram_gb, "usd_per_hour": g.usd_per_hour}
            for g in matrix.gpus.values()
        },
        "models": {
            m.key: {
                "name": m.name,
                "huggingface_id": m.huggingface_id,
                "max_model_len": m.max_model_len,
                "gated": m.gated,
                "cells": {f.gpu.key: _cell_data(f) for f in
                          (matrix.fit(m, g) for g in matrix.gpus.values())},
            }
            for m in matrix.models.values()
        },
        "apps": [
            {"app": a.name, "url": a.url_pattern, "models": [p.model.key for p in a.pools]}
            for a in gpu_apps
        ],
        "endpoints": {
            "gpu_based": len(gpu_apps),
            "legacy": len(legacy),
            "starter_plan_limit": limit,
        },
        "billing": _billing_data(matrix),
    }


def _billing_data(matrix: config.Matrix) -> dict:
    b, router = matrix.billing, matrix.router_bill
    return {"cpu_core_usd_per_hour": b.cpu_core_usd_per_hour,
            "memory_gib_usd_per_hour": b.memory_gib_usd_per_hour,
            "read_on": b.read_on, "source": b.source,
            "router_usd_per_hour": round(router.usd_per_hour, 4)}


def _reservation(bill: config.Bill) -> dict:
    """A replica's $/hour split, and the CPU and memory it reserves (--list and --dry-run)."""
    return {"usd_per_hour_split": {k: round(v, 4) for k, v in bill.split().items()},
            "cpu_cores": bill.cpu_cores, "memory_mib": bill.memory_mib}


def _cell_data(fit: config.Fit) -> dict:
    if not fit.fits:
        return {"fits": False, "reason": fit.reason}
    return {
        "fits": True,
        "gpu": fit.gpu_string,
        "gpu_count": fit.count,
        "tensor_parallel_size": fit.count,
        "kv_cache_tokens": fit.kv_tokens,
        "need_gib": round(fit.need_gib, 1),
        "budget_gib": round(fit.budget_gib, 1),
        "usd_per_hour": round(fit.usd_per_hour, 2),  # GPUs + CPU + memory, per replica
        **_reservation(fit.bill()),
        "legacy_app": config.legacy_app_name(fit.model.key, fit.gpu.key),
    }


def _tokens(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _cell_lines(cell: dict) -> str:
    """One cell of the --list table, one short fact per line (the table fits 80 columns)."""
    if not cell["fits"]:
        return "[red]no fit[/red]"  # the reason is printed under the table
    count = cell["gpu_count"]
    return (f"{count} GPU{'s' if count > 1 else ''}\n${cell['usd_per_hour']:.2f}/h\n"
            f"{_tokens(cell['kv_cache_tokens'])} tok")


def show_matrix(matrix: config.Matrix) -> None:
    from rich.markup import escape
    from rich.table import Table

    data = matrix_data(matrix)
    console = _console()
    # Titles are printed apart from their tables: rich pads a table's title to the table's
    # width, which leaves trailing blanks on every copy of the output.
    console.print(f"Models x GPUs ({escape(matrix.path.name)}): per replica, GPUs (tensor "
                  "parallel),\n$/hour while it runs, and tokens of KV cache beside the weights")
    table = Table()
    table.add_column("model", no_wrap=True)
    for gpu in matrix.gpus.values():
        table.add_column(f"{gpu.key}\n{gpu.vram_gb:g} GB", justify="center", no_wrap=True)
    for key, model in data["models"].items():
        table.add_row(f"[bold]{key}[/bold]", *map(_cell_lines, model["cells"].values()))
    console.print(table)
    # The price note wrapped here, not by rich, so a copy of the output has no ragged
    # padding; 80 columns like the tables.
    console.print(textwrap.fill(_price_note(matrix), 80), soft_wrap=True)
    for key, model in data["models"].items():
        for gpu_key, cell in model["cells"].items():
            if not cell["fits"]:
                console.print(f"[red]{key} on {gpu_key} does not fit:[/red] "
                              f"{escape(cell['reason'])}", soft_wrap=True)

    console.print("GPU-based apps, one web endpoint each")
    apps = Table()
    apps.add_column("app", no_wrap=True)
    apps.add_column("endpoint", no_wrap=True)
    apps.add_column("models")
    for app in data["apps"]:
        apps.add_row(app["app"], app["url"], str(len(app["models"])))
    console.print(apps)
    ends = data["endpoints"]
    limit = ends["starter_plan_limit"]
    for label, count in (("GPU-based", ends["gpu_based"]), ("Legacy", ends["legacy"])):
        verdict = ("[green]within[/green]" if count <= limit else "[red]exceeds[/red]")
        console.print(f"{label}: {count} endpoints, {verdict} Modal's Starter limit of {limit}")
    console.print("Legacy apps are named vllm-<model>-<gpu>, e.g. "
                  f"{config.legacy_app_name(next(iter(matrix.models)), next(iter(matrix.gpus)))}")


def _price_note(matrix: config.Matrix) -> str:
    """How a cell's price is made, with the first cell that fits as the example."""
    b = matrix.billing
    example = next((f for f in (matrix.fit(m, g) for m in matrix.models.values()
                                for g in matrix.gpus.values()) if f.fits), None)
    note = (f"$/hour = GPUs + the CPU and memory each replica reserves (Modal bills both; "
            f"${b.cpu_core_usd_per_hour:g}/core, ${b.memory_gib_usd_per_hour:g}/GiB per hour, "
            f"read {b.read_on})")
    if example is None:
        return note + "."
    bill = example.bill()
    return note + (f", e.g. {example.model.key} on {example.gpu.key}: "
                   f"{_bill_text(bill)}. GPU apps add ${matrix.router_bill.usd_per_hour:.2f}/h "
                   "for their CPU router while up.")


def _bill_text(bill: config.Bill) -> str:
    return (f"${bill.gpu_usd_per_hour:.2f} GPU + ${bill.cpu_usd_per_hour:.2f} CPU "
            f"({bill.cpu_cores:g} cores) + ${bill.memory_usd_per_hour:.2f} memory "
            f"({bill.memory_mib / 1024:g} GiB)")


# ## --dry-run


def plan_data(matrix: config.Matrix, apps) -> list[dict]:
    import plan

    defaults = matrix.defaults
    return [
        {
            "app": app.name,
            "kind": app.kind,
            "endpoint": app.url_pattern,
            "web_function": plan.WEB_FUNCTION,
            "secrets": app.secrets,
            "volumes": {at: name for p in app.pools for at, name in p.volumes.items()}
            or dict(plan.VOLUMES),
            "vllm_version": defaults.vllm_version,
            "timeouts": _timeouts(app, defaults),
            # GPU apps run a CPU router in front of their pools; legacy apps have none.
            "router_usd_per_hour": (round(matrix.router_bill.usd_per_hour, 4)
                                    if app.kind == "gpu" else 0.0),
            "pools": [
                {
                    "model": p.model.key,
                    "served_name": p.model.name,
                    "gpu": p.fit.gpu_string,
                    "tensor_parallel_size": p.fit.count,
                    "command": p.argv,
                    "secrets": p.secrets,
                    "snapshot": p.snapshot,
                    "adapters": [a.name for a in p.model.adapters],
                    "scaledown_window_seconds": defaults.scaledown_window_seconds,
                    "max_concurrent_inputs": defaults.max_concurrent_inputs,
                    "max_replicas": defaults.max_replicas,
                    "usd_per_hour_per_replica": round(p.usd_per_hour, 2),
                    **_reservation(p.bill),
                    "usd_per_idle_tail": round(p.idle_tail_usd(defaults), 2),
                }
                for p in app.pools
            ],
            "not_served": {f.model.key: f.reason for f in app.skipped},
        }
        for app in apps
    ]


def _timeouts(app, defaults: config.Defaults) -> dict:
    import plan

    t = plan.timeouts(defaults)
    own = {"startup_seconds": t.startup, "request_seconds": t.request}
    if app.kind == "legacy":  # its web function is the engine: no router in front
        return own
    return {"router_seconds": t.router, "router_waits_seconds": t.router_wait, **own}


def _duration(seconds: int) -> str:
    return f"{seconds / 60:g} min" if seconds % 60 == 0 else f"{seconds} s"


def show_plan(matrix: config.Matrix, apps) -> None:
    from rich.markup import escape

    console = _console()
    minutes = matrix.defaults.scaledown_window_seconds / 60
    for app in plan_data(matrix, apps):
        lines = [
            f"[bold]{app['app']}[/bold] ({app['kind']} app)",
            f"  endpoint   {app['endpoint']}  (function '{app['web_function']}', the only one)",
            f"  secrets    {', '.join(app['secrets'])}",
            "  volumes    " + ", ".join(f"{name} at {at}" for at, name in app["volumes"].items()),
            f"  image      vllm=={escape(app['vllm_version'])}",
        ]
        t = app["timeouts"]
        pools = f"{_duration(t['startup_seconds'])} to start, {_duration(t['request_seconds'])} a request"
        if "router_seconds" in t:
            lines.append(f"  timeouts   pools {pools}; router {_duration(t['router_seconds'])} "
                         f"(waits {_duration(t['router_waits_seconds'])} for a pool: both, "
                         "as a wait for a GPU is in neither)")
        else:
            lines.append(f"  timeouts   {pools}")
        if app["router_usd_per_hour"]:
            lines.append(f"  router     ${app['router_usd_per_hour']:.2f}/h while up "
                         f"({config.ROUTER_CPU_CORES:g} core, "
                         f"{config.ROUTER_MEMORY_MIB / 1024:g} GiB; it scales to zero too)")
        for pool in app["pools"]:
            lines += [
                (f"  [bold]{pool['model']}[/bold] ({escape(pool['served_name'])}) on "
                 f"{pool['gpu']}{'  GPU snapshot' if pool['snapshot'] else ''}"),
                (f"    cost     ${pool['usd_per_hour_per_replica']:.2f}/h per running replica; "
                 f"idle it scales to zero after {minutes:g} min "
                 f"(each idle tail ≈ ${pool['usd_per_idle_tail']:.2f})"),
                (f"    reserves {pool['cpu_cores']:g} CPU cores, "
                 f"{pool['memory_mib'] / 1024:g} GiB memory: "
                 + _split_text(pool["usd_per_hour_split"])),
                (f"    scaling  0 to {pool['max_replicas']} replicas, "
                 f"{pool['max_concurrent_inputs']} requests each"),
                f"    secrets  {', '.join(pool['secrets']) or 'none'}",
                # One line however long, so that it can be copied and run as it is.
                f"    command  {escape(shlex.join(pool['command']))}",
            ]
        for model, reason in app["not_served"].items():
            lines.append(f"  [red]{model} not served here:[/red] {escape(reason)}")
        for line in lines:
            console.print(line, soft_wrap=True)
        console.print()
    console.print(f"Dry run: {len(apps)} app(s), nothing deployed. "
                  "Without --dry-run this needs a Modal token (uv run modal token new).",
                  soft_wrap=True)


def _split_text(split: dict) -> str:
    return (f"${split['gpu']:.2f} GPU + ${split['cpu']:.2f} CPU + "
            f"${split['memory']:.2f} memory per hour")


# ## --serve-local


def _serve_local(matrix: config.Matrix, o) -> None:
    import gateway

    gateway.serve_local(matrix, o.upstream or [], host=o.host, port=o.port,
                        api_key=command_line.api_key_from_environment(),
                        allow_unauthenticated=o.allow_unauthenticated)


# ## --test-gpu, --test, --warm, --bench (the work is in checks.py and bench.py)

LOAD_OPTIONS = ("concurrency", "requests", "input_len", "output_len")
BENCH_OPTIONS = (*LOAD_OPTIONS, "max_ttft_ms", "max_tpot_ms", "results_dir")


def _test_and_bench(matrix: config.Matrix, o) -> None:
    import checks
    import plan

    if o.test:
        app = plan.legacy_app(matrix, o.test)
    elif o.test_gpu:
        app = plan.gpu_app(matrix, o.test_gpu)
    else:
        app = plan.app_for_key(matrix, o.warm or o.bench)
    if o.bench:  # usage errors before any lookup on Modal
        import bench as benchmark

        settings = benchmark.Settings(**{k: getattr(o, k) for k in LOAD_OPTIONS
                                         if getattr(o, k) is not None}).check()
        if not o.test_model and len(app.pools) != 1:
            raise config.UsageError(f"--bench needs --test-model NAME: {app.name} serves "
                                    f"{', '.join(p.model.key for p in app.pools)}")
    keep_warm_s = config.parse_duration(o.keep_warm) if o.keep_warm else None
    target = checks.resolve_target(
        matrix, app, test_model=o.test_model, base_url=o.base_url,
        api_key=o.api_key or command_line.api_key_from_environment(),
        deadline_s=config.parse_duration(o.deadline) if o.deadline else None,
        environment=o.environment, require_key=bool(o.test_gpu or o.test))
    if o.test_gpu or o.test:
        code = checks.run_conformance(target, as_json=o.as_json)
    elif o.warm:
        code = checks.warm_endpoint(
            target, keep_warm_s=keep_warm_s,
            scaledown_window_s=matrix.defaults.scaledown_window_seconds, as_json=o.as_json)
    else:
        code = benchmark.run_bench(
            target, settings,
            results_dir=o.results_dir or benchmark.DEFAULT_RESULTS_DIR,
            max_ttft_ms=o.max_ttft_ms, max_tpot_ms=o.max_tpot_ms, as_json=o.as_json)
    if code:
        raise typer.Exit(code)


# ## --batch KEY --input FILE (the work is in batch.py)


def _batch(matrix: config.Matrix, o) -> None:
    import batch
    import plan

    code = batch.batch_command(
        matrix, plan.app_for_key(matrix, o.batch), o.batch, input_path=o.input_file,
        output=o.output, test_model=o.test_model, base_url=o.base_url,
        api_key=o.api_key or command_line.api_key_from_environment(),
        api_key_given=bool(o.api_key), deadline=o.deadline, concurrency=o.concurrency,
        environment=o.environment,
        config_path=None if o.config_path == config.DEFAULT_PATH else o.config_path,
        dry_run=o.dry_run, as_json=o.as_json, results_dir=o.results_dir)
    if code:
        raise typer.Exit(code)


# ## --litellm-config, --url KEY --format (the work is in exports.py)


def _litellm_config(matrix: config.Matrix, o) -> None:
    from rich.markup import escape

    import exports

    text = exports.litellm_config_text(matrix, workspace=o.workspace)
    if str(o.output) == "-":
        sys.stdout.write(text)
        return
    path = o.output or exports.DEFAULT_LITELLM_CONFIG
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise config.UserError(f"{path}: cannot write: {exc.strerror or exc}") from None
    names = [m["model_name"] for m in exports.litellm_config(matrix)["model_list"]]
    console = _console()
    console.print(f"Wrote {escape(str(path))}: {len(set(names))} model names for the LiteLLM "
                  "proxy (<model>-<gpu>, and <model> routed to the cheapest GPU first)",
                  soft_wrap=True)
    console.print(f"It reads {', '.join(exports.required_env(matrix, workspace=o.workspace))}",
                  soft_wrap=True)
    missing = [] if o.workspace else exports.compose_missing_env(matrix)
    if missing:
        console.print(f"[yellow]Warning:[/yellow] {exports.COMPOSE_FILE.name} does not set "
                      f"{', '.join(missing)}; add each as https://${{MODAL_WORKSPACE}}--vllm-"
                      "<gpu>-serve.modal.run/v1 beside the others", soft_wrap=True)


def _report(matrix: config.Matrix, o) -> None:
    import bench
    import report

    report.report_command(o.results_dir or bench.DEFAULT_RESULTS_DIR, o.output)


def _url(matrix: config.Matrix, o) -> None:
    import cloud
    import exports

    chosen = (o.fmt or ("json" if o.as_json else "url")).strip().lower()  # checked: VALUES
    if o.as_json and chosen != "json":
        raise config.UsageError(f"--json and --format {chosen} disagree; choose one")
    key = None
    if o.with_key:
        if chosen == "url":
            raise config.UsageError("--with-key goes with --format env or --format json")
        key = command_line.api_key_from_environment()
        if not key:
            raise config.UsageError(f"--with-key reads {exports.API_KEY_ENV}, which is not set "
                                    "(in the environment or ./.env)")
    found = cloud.endpoint_url(matrix, o.url, environment=o.environment)
    sys.stdout.write(exports.endpoint_text(found, chosen, api_key=key))


# ## --list, deploy, --status, --stop, --upload-adapter


def _list(matrix: config.Matrix, o) -> None:
    return _print_json(matrix_data(matrix)) if o.as_json else show_matrix(matrix)


def _deploy(matrix: config.Matrix, o) -> None:
    import plan

    if o.gpu:
        apps = [plan.gpu_app(matrix, o.gpu)]
    elif o.all_:
        apps = plan.all_gpu_apps(matrix)
    else:
        apps = [plan.legacy_app(matrix, o.model)]
    if o.dry_run:
        return _print_json(plan_data(matrix, apps)) if o.as_json else show_plan(matrix, apps)
    import cloud

    cloud.deploy_command(matrix, apps, environment=o.environment,
                         ignore_endpoint_limit=o.ignore_endpoint_limit, verbose=o.verbose)


def _operate(matrix: config.Matrix, o) -> None:
    import cloud

    cloud.operate(matrix, status=o.status, stop=o.stop, yes=o.yes, as_json=o.as_json,
                  environment=o.environment)


def _upload_adapter(matrix: config.Matrix, o) -> None:
    import adapters

    adapters.upload_command(matrix, *o.upload_adapter, redeploy=o.redeploy,
                            environment=o.environment, verbose=o.verbose)


# ## The command
#
# One action per call. Every other option modifies some actions and is a usage
# error with any other (never silently ignored); "given" means on the command
# line, so defaults and environment variables never count.

ACTIONS = {  # parameter -> what it does
    "list_": _list, "gpu": _deploy, "all_": _deploy, "model": _deploy,
    "url": _url, "status": _operate, "stop": _operate,
    "test_gpu": _test_and_bench, "test": _test_and_bench, "warm": _test_and_bench,
    "bench": _test_and_bench, "serve_local": _serve_local,
    "upload_adapter": _upload_adapter, "litellm_config": _litellm_config,
    "batch": _batch,
    "report": _report,
}
TESTS = ("test_gpu", "test", "warm", "bench")
MODIFIERS = {  # parameter -> the actions it goes with
    "dry_run": ("gpu", "all_", "model", "batch"),
    "ignore_endpoint_limit": ("gpu", "all_", "model"),
    "yes": ("stop",),
    "upstream": ("serve_local",), "host": ("serve_local",), "port": ("serve_local",),
    "allow_unauthenticated": ("serve_local",),
    "test_model": (*TESTS, "batch"), "base_url": (*TESTS, "batch"),
    "api_key": (*TESTS, "batch"), "deadline": (*TESTS, "batch"),
    "keep_warm": ("warm",),
    **dict.fromkeys(BENCH_OPTIONS, ("bench",)),
    "concurrency": ("bench", "batch"), "input_file": ("batch",),
    "results_dir": ("bench", "batch", "report"),
    "redeploy": ("upload_adapter",),
    "output": ("litellm_config", "batch", "report"), "workspace": ("litellm_config",),
    "fmt": ("url",), "with_key": ("url",),
    "as_json": ("list_", "gpu", "all_", "model", "url", "status", *TESTS, "batch"),
}


# Every option's value, checked in one place before anything slow (the matrix, Modal, the
# network): the problem as one line, or None. Names (GPU and model keys, --test-model) are
# checked against the matrix by the actions, offline, before any lookup; --host and --port
# by --serve-local.
VALUES = {
    "deadline": command_line.duration_above_zero,
    "keep_warm": command_line.duration_above_zero,
    **dict.fromkeys(LOAD_OPTIONS, command_line.at_least_one),
    "max_ttft_ms": command_line.above_zero, "max_tpot_ms": command_line.above_zero,
    "results_dir": command_line.directory_or_new,
    "base_url": command_line.http_url, "api_key": command_line.not_empty,
    "test_model": command_line.not_empty, "environment": command_line.not_empty,
    "fmt": command_line.one_of("url", "env", "json"),  # exports.FORMATS (not imported here)
}


def _flag(ctx: typer.Context, name: str) -> str:
    return next(p.opts[0] for p in ctx.command.params if p.name == name)


def _either(flags: list[str]) -> str:
    return flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} or {flags[-1]}"


def _chosen_action(ctx: typer.Context) -> str:
    """The one action of this call; a missing one or two of them is a usage error (exit 2)."""
    chosen = [name for name in ACTIONS if ctx.params[name]]
    if len(chosen) != 1:
        raise config.UsageError(
            "choose one action: --list, --gpu KEY, --all or --model MODEL-GPU; "
            "or operate: --url KEY, --status, --stop KEY; or test: --test-gpu KEY, "
            "--test MODEL-GPU, --warm KEY, --bench KEY; or --batch KEY; or --serve-local, "
            "--upload-adapter, --litellm-config, --report (--help shows them all)" if not chosen
            else f"choose one of {', '.join(_flag(ctx, n) for n in chosen)}")
    return chosen[0]


def _check_modifiers(ctx: typer.Context, action: str) -> None:
    from typer._click.core import ParameterSource

    for name, actions in MODIFIERS.items():
        given = ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
        if given and action not in actions:
            goes_with = _either(list(dict.fromkeys(_flag(ctx, a) for a in actions)))
            raise config.UsageError(f"{_flag(ctx, name)} goes with {goes_with}, "
                                    f"not {_flag(ctx, action)}")


def _check_values(ctx: typer.Context) -> None:
    for name, check in VALUES.items():
        value = ctx.params[name]
        problem = None if value is None else check(_flag(ctx, name), value)
        if problem:
            raise config.UsageError(problem)


@cli.command(cls=command_line.Command, epilog=EXAMPLES,
             help="Deploy, test and operate vLLM endpoints on Modal.")
def main(
    ctx: typer.Context,
    list_: Annotated[bool, typer.Option(
        "--list", help="Show models x GPUs: fits, prices, endpoints.",
        rich_help_panel=MATRIX)] = False,
    gpu: Annotated[str | None, typer.Option(
        "--gpu", metavar="KEY", help="Deploy the app for one GPU type (e.g. h100).",
        rich_help_panel=DEPLOY)] = None,
    all_: Annotated[bool, typer.Option(
        "--all", help="Deploy every GPU app.", rich_help_panel=DEPLOY)] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="With --gpu, --all or --model: show what would be deployed; "
        "offline, no Modal account needed. With --batch: check the file and count, send nothing.",
        rich_help_panel=DEPLOY)] = False,
    model: Annotated[str | None, typer.Option(
        "--model", metavar="MODEL-GPU", help="Deploy one legacy app (e.g. gemma-3-12b-l40s).",
        rich_help_panel=LEGACY)] = None,
    serve_local: Annotated[bool, typer.Option(
        "--serve-local", help="Run the gateway here, in front of OpenAI-compatible servers you "
        "already run (e.g. vllm serve); the key comes from VLLM_API_KEY (or ./.env).",
        rich_help_panel=LOCAL)] = False,
    upstream: Annotated[list[str] | None, typer.Option(
        "--upstream", metavar="MODEL=URL", help="Where one model is served (repeatable); a bare "
        "URL serves every model.", rich_help_panel=LOCAL)] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address the local gateway listens on.", rich_help_panel=LOCAL)
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        "--port", help="Port of the local gateway (0..65535; 0 picks a free one).",
        rich_help_panel=LOCAL)] = 8080,
    allow_unauthenticated: Annotated[bool, typer.Option(
        "--allow-unauthenticated", help="Serve without VLLM_API_KEY (anyone who reaches the "
        "port can use it).", rich_help_panel=LOCAL)] = False,
    url: Annotated[str | None, typer.Option(
        "--url", metavar="KEY", help="Print the deployed endpoint URL of a GPU or legacy key, "
        "alone on stdout.", rich_help_panel=OPERATE)] = None,
    status: Annotated[bool, typer.Option(
        "--status", help="Every app of the matrix: deployed or not, URL, running containers "
        "per model pool.", rich_help_panel=OPERATE)] = False,
    stop: Annotated[str | None, typer.Option(
        "--stop", metavar="KEY|all", help="Stop a deployed app (GPU or legacy key), or every "
        "app of the matrix.", rich_help_panel=OPERATE)] = None,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="With --stop: do not ask for confirmation.",
        rich_help_panel=OPERATE)] = False,
    ignore_endpoint_limit: Annotated[bool, typer.Option(
        "--ignore-endpoint-limit", help="Deploy even past Modal's Starter limit of 8 web "
        "endpoints (for plans that allow more).", rich_help_panel=DEPLOY)] = False,
    environment: Annotated[str | None, typer.Option(
        "--env", "--environment", metavar="NAME", envvar="MODAL_ENVIRONMENT",
        help="Modal environment to deploy to and look in (default: your profile's).",
        rich_help_panel=OUTPUT)] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="On errors, show the traceback too.", rich_help_panel=OUTPUT)] = False,
    test_gpu: Annotated[str | None, typer.Option(
        "--test-gpu", metavar="KEY", help="Run the conformance suite against a GPU app's "
        "endpoint: auth, models, chat, completions, streaming, every structured-output form.",
        rich_help_panel=TEST)] = None,
    test: Annotated[str | None, typer.Option(
        "--test", metavar="MODEL-GPU", help="Run the conformance suite against a legacy app "
        "(e.g. gemma-3-12b-l40s).", rich_help_panel=TEST)] = None,
    warm: Annotated[str | None, typer.Option(
        "--warm", metavar="KEY", help="Wake every model of an app in parallel with a real "
        "one-token completion; report each one's time to first success.",
        rich_help_panel=TEST)] = None,
    bench: Annotated[str | None, typer.Option(
        "--bench", metavar="KEY", help="Benchmark one model (--test-model) on an app: TTFT, "
        "TPOT, ITL, E2EL, throughput, $ per million output tokens; ranks saved runs by cost.",
        rich_help_panel=TEST)] = None,
    test_model: Annotated[str | None, typer.Option(
        "--test-model", metavar="NAME", help="Only this model of the app (with --batch: the "
        "model of lines that name none).",
        rich_help_panel=TEST)] = None,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", metavar="URL", help="Test, warm, benchmark or run a batch against this "
        "endpoint instead of looking the app's URL up on Modal.", rich_help_panel=TEST)] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", metavar="KEY", help="Bearer key of the endpoint (default: $VLLM_API_KEY, "
        "else VLLM_API_KEY in ./.env); never printed.", rich_help_panel=TEST, show_default=False)] = None,
    deadline: Annotated[str | None, typer.Option(
        "--deadline", metavar="DURATION", help="How long to wait through cold starts "
        "(e.g. 90s, 15m; with --batch: how long a model may answer nothing) \\[default: 15m].",
        rich_help_panel=TEST)] = None,
    keep_warm: Annotated[str | None, typer.Option(
        "--keep-warm", metavar="DURATION", help="With --warm: keep pinging (well inside the "
        "scaledown window) for this long, e.g. 2h; prints what it costs per hour.",
        rich_help_panel=TEST)] = None,
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", metavar="N", help="With --bench: requests in flight \\[default: 16]; "
        "with --batch: \\[default: 32 per model in the file].",
        rich_help_panel=TEST)] = None,
    requests: Annotated[int | None, typer.Option(
        "--requests", metavar="N", help="With --bench: requests in the run \\[default: 128].",
        rich_help_panel=TEST)] = None,
    input_len: Annotated[int | None, typer.Option(
        "--input-len", metavar="N", help="With --bench: prompt words, about as many tokens "
        "\\[default: 1024].", rich_help_panel=TEST)] = None,
    output_len: Annotated[int | None, typer.Option(
        "--output-len", metavar="N", help="With --bench: output tokens per request "
        "\\[default: 128].", rich_help_panel=TEST)] = None,
    max_ttft_ms: Annotated[float | None, typer.Option(
        "--max-ttft-ms", metavar="MS", help="With --bench: rank only GPUs whose p99 TTFT is "
        "within this first.", rich_help_panel=TEST)] = None,
    max_tpot_ms: Annotated[float | None, typer.Option(
        "--max-tpot-ms", metavar="MS", help="With --bench: rank only GPUs whose p99 TPOT is "
        "within this first.", rich_help_panel=TEST)] = None,
    results_dir: Annotated[Path | None, typer.Option(
        "--results-dir", metavar="PATH", help="With --bench and --batch: where runs are saved "
        "(and --bench compares them); with --report: where they are read \\[default: results].",
        rich_help_panel=TEST)] = None,
    upload_adapter: Annotated[tuple[str, str, Path] | None, typer.Option(
        "--upload-adapter", metavar="MODEL NAME DIR", help="Check a LoRA adapter directory "
        "(adapter_config.json, base model, rank, weights) and upload it to the adapters Volume; "
        "NAME must be declared under the model's adapters in models.yaml.",
        rich_help_panel=ADAPTERS, show_default=False)] = None,
    redeploy: Annotated[bool, typer.Option(
        "--redeploy", help="With --upload-adapter: redeploy the deployed apps that serve the "
        "model, so new replicas load it.", rich_help_panel=ADAPTERS)] = False,
    litellm_config: Annotated[bool, typer.Option(
        "--litellm-config", help="Write a LiteLLM proxy config from the matrix: <model>-<gpu> "
        "for each GPU app, <model> alone routed to the cheapest GPU first (docker-compose.yml "
        "runs it).", rich_help_panel=EXPORT)] = False,
    report: Annotated[bool, typer.Option(
        "--report", help="Write one self-contained HTML page of the saved --bench and --batch "
        "runs: $ per million output tokens against p99 TTFT and TPOT per GPU, the targets, "
        "the cheapest GPU, every figure (opens offline).", rich_help_panel=EXPORT)] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="PATH", help="With --litellm-config or --report: the file to "
        "write, '-' for stdout \\[default: litellm_config.yaml; report.html in --results-dir]. "
        "With --batch: the answers \\[default: <input>.output.jsonl beside the input].",
        rich_help_panel=EXPORT,
        show_default=False)] = None,
    workspace: Annotated[str | None, typer.Option(
        "--workspace", metavar="NAME", help="With --litellm-config: write this Modal "
        "workspace's endpoint URLs into the file instead of reading VLLM_<GPU>_API_BASE.",
        rich_help_panel=EXPORT)] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", metavar="url|env|json", help="With --url: the URL alone, LLM_BASE_URL= and "
        "LLM_API_KEY= lines for a .env file, or JSON.", rich_help_panel=EXPORT)] = None,
    with_key: Annotated[bool, typer.Option(
        "--with-key", help="With --url --format env|json: fill in the key from VLLM_API_KEY "
        "(else it is left empty).", rich_help_panel=EXPORT)] = False,
    batch: Annotated[str | None, typer.Option(
        "--batch", metavar="KEY", help="Send a file of OpenAI Batch API requests (--input) "
        "through a GPU or legacy app: checked first, retried through cold starts, answers in "
        "OpenAI's batch output format, resumable; tokens and estimated cost per model.",
        rich_help_panel=BATCH)] = None,
    input_file: Annotated[Path | None, typer.Option(
        "--input", metavar="FILE", help="With --batch: the requests, one JSON object a line "
        "(custom_id, method, url, body).", rich_help_panel=BATCH)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print machine-readable JSON instead of tables.",
        rich_help_panel=OUTPUT)] = False,
    config_path: Annotated[Path, typer.Option(
        "--config", metavar="PATH", help="Matrix file to read.", envvar="MODAL_VLLM_CONFIG",
        rich_help_panel=OUTPUT)] = config.DEFAULT_PATH,
) -> None:
    try:
        action = _chosen_action(ctx)
        _check_modifiers(ctx, action)
        _check_values(ctx)
        matrix = config.load(config_path)
        ACTIONS[action](matrix, SimpleNamespace(**ctx.params))
    except config.UserError as exc:
        if verbose:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        raise _fail(exc) from None


if __name__ == "__main__":
    cli()
