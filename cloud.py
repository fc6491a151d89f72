"""Cloud operations through the Modal SDK: deploy, look up, list and stop the matrix's apps.

`deploy.py` imports this module only in the branches that talk to Modal, so
`--list`, `--dry-run` and `--help` never import modal. Each command here runs
its offline checks first (the fit check, credentials present), then its online
ones (Secrets exist, room for more web endpoints), then acts.

Every failure Modal can be expected to raise becomes one `config.UserError`
subclass with its own exit code and one line of text (keys masked); the
original exception stays chained for `--verbose`. The exit codes:

    0  ok
    1  failed: the app is not deployed, a deploy of --all failed, a stop was declined,
       or Modal failed in a way not listed below
    2  usage error: flags, unknown key, or nothing that fits to deploy
    3  models.yaml is invalid
    4  not authenticated: no Modal token, a rejected one, or no permission
    5  Modal unreachable: network down, Modal unavailable or timing out
    6  a Modal Secret the apps need is missing
    7  a limit was reached: Starter plan web endpoints, or a Modal quota
    8  the build or the deploy itself failed (image build, invalid app)
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import config
import plan

DEPLOY_CONCURRENCY = 3  # deploys of --all at a time: each uploads files and builds images
LOOKUP_CONCURRENCY = 8  # status lookups at a time: each is a short Modal RPC
ENVIRONMENT_HINT = "MODAL_ENVIRONMENT"


# ## Errors: one class per expected failure, each with its own exit code


class NotDeployedError(config.UserError):
    """The app (or its endpoint) is not deployed in this environment."""

    exit_code = 1


class DeployFailedError(config.UserError):
    """One or more deploys failed; the per-app reasons are the message's lines."""

    exit_code = 1


class NotAuthenticatedError(config.UserError):
    exit_code = 4


class ModalUnreachableError(config.UserError):
    exit_code = 5


class SecretMissingError(config.UserError):
    exit_code = 6


class AdapterMissingError(config.UserError):
    exit_code = 6


class LimitReachedError(config.UserError):
    exit_code = 7


class BuildFailedError(config.UserError):
    exit_code = 8


# What README.md ("Exit codes") and deploy.py's epilog document; a test keeps them in step.
EXIT_CODES = {
    0: "ok",
    1: "failed (not deployed, a deploy failed, stop declined)",
    2: "usage error",
    3: "invalid models.yaml",
    4: "not authenticated with Modal",
    5: "Modal unreachable",
    6: "Modal Secret or LoRA adapter missing",
    7: "limit reached (endpoints, quota)",
    8: "build or deploy failed",
    9: "the local gateway cannot listen (--serve-local: address in use or not on this machine)",
}

_MASKED = re.compile(
    r"\b(?:ak|as|wk|ws|tk|st)-[A-Za-z0-9]{6,}"  # Modal token ids and secrets
    r"|\bhf_[A-Za-z0-9]{6,}"  # Hugging Face tokens
    r"|\bsk-[A-Za-z0-9_-]{8,}"  # OpenAI-style keys
    r"|(?i:bearer)\s+\S+"
)
_KEY_VARIABLES = ("VLLM_API_KEY", "API_KEY", "HF_TOKEN", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET")


def mask(text: str) -> str:
    """Keys never reach the terminal: known key shapes and the values of key variables."""
    for name in _KEY_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 6:
            text = text.replace(value, "***")
    return _MASKED.sub(lambda m: m.group(0)[:3] + "***", text)


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    text = mask(text or type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# The SDK is imported here, after the error classes: importing modal reads
# ~/.modal.toml, and a broken one must be one line too, not a traceback.
try:
    import modal
    import modal.config
    import modal.exception
    import modal.experimental
    import modal.output
except Exception as exc:  # only modal's InvalidError is expected here
    if type(exc).__name__ != "InvalidError":
        raise
    raise NotAuthenticatedError(f"cannot read Modal's config file: {one_line(exc)}; fix or "
                                "remove it, then run `uv run modal token new`") from exc

import gpu_pool  # imports modal itself
import modal_connection
import pool_state


def _env_note(environment: str | None) -> str:
    return f" in environment '{environment}'" if environment else ""


def _env_flag(environment: str | None) -> str:
    return f" --env {environment}" if environment else ""


_LIMIT_WORDS = re.compile(r"\bquota\b|\b(endpoint|app|function|container|gpu|workspace)s? limit\b"
                          r"|\blimit (of|reached|exceeded)\b", re.IGNORECASE)


def _is_limit(exc: BaseException, detail: str) -> bool:
    """Quotas are RESOURCE_EXHAUSTED; other limits are known only by their wording."""
    if isinstance(exc, modal.exception.ResourceExhaustedError):
        return True
    return (isinstance(exc, modal.exception.Error) and not _is_network(exc)
            and bool(_LIMIT_WORDS.search(detail)))


def _is_network(exc: BaseException) -> bool:
    import grpclib.exceptions

    network = (modal.exception.ConnectionError, modal.exception.ServiceError,
               modal.exception.TimeoutError, ConnectionError, TimeoutError,
               grpclib.exceptions.StreamTerminatedError)
    if isinstance(exc, network):
        return True
    import socket

    return isinstance(exc, socket.gaierror)  # DNS: no network at all


def translate(exc: BaseException, doing: str, *, building: bool = False) -> config.UserError:
    """Any exception of a Modal call to one line with the exit code its kind deserves.

    `doing` names the step ("deploying vllm-h100"); `building` says a deploy was
    under way, so an invalid app or a failed image build is a build failure.
    """
    if isinstance(exc, config.UserError):
        return exc
    errors = modal.exception
    detail = one_line(exc)
    if isinstance(exc, errors.AuthError):
        error = NotAuthenticatedError(f"{doing}: Modal rejected the credentials ({detail}); "
                                      "run `uv run modal token new`")
    elif isinstance(exc, errors.PermissionDeniedError):
        error = NotAuthenticatedError(f"{doing}: Modal denied permission ({detail}); check the "
                                      "token's workspace and environment (`uv run modal token "
                                      "new` to switch)")
    elif _is_limit(exc, detail):
        error = LimitReachedError(f"{doing}: a Modal limit was reached ({detail}); stop apps "
                                  "you do not need (uv run deploy.py --status, then --stop "
                                  "KEY) or raise your plan's limits")
    elif _is_network(exc):
        error = ModalUnreachableError(f"{doing}: cannot reach Modal ({detail}); check the "
                                      "network connection and retry")
    elif isinstance(exc, errors.NotFoundError):
        error = config.UserError(f"{doing}: not found on Modal ({detail})")
    elif building:
        # ImageBuildError (a RemoteError), InvalidError, ExecutionError, a local file gone...
        error = BuildFailedError(f"{doing} failed: {detail} (Modal's build output is above; "
                                 "--verbose shows the traceback)")
    elif isinstance(exc, errors.Error):
        error = config.UserError(f"{doing}: Modal failed: {detail}")
    else:
        error = config.UserError(f"{doing} failed: {type(exc).__name__}: {detail}")
    error.__cause__ = exc  # --verbose prints the original traceback
    return error


# ## Offline preflight: the fit check, and credentials present


def require_credentials() -> None:
    """A Modal token (env MODAL_TOKEN_ID/SECRET, or the active profile of ~/.modal.toml), offline;
    with one, the connection to Modal is opened (connect) before any other call.

    Modal itself would only notice at the first RPC, after the apps were built.
    """
    settings = modal.config.config

    def present(*keys: str) -> bool:
        return all(settings.get(key) for key in keys)

    if present("token_id", "token_secret") or present("oauth_refresh_token", "oauth_client_id"):
        connect()
        return
    raise NotAuthenticatedError(
        "not logged in to Modal (no token in MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or "
        f"{modal.config.user_config_path}); run `uv run modal token new`"
    )


_connected = False


def connect() -> None:
    """Open the SDK's connection to Modal once, before the first call, saying what it waits
    for when that takes long and giving up at once when no retry can help (exit 5), instead
    of a silent minute (modal_connection.py has the why and the how)."""
    global _connected
    if _connected:
        return
    server_url = modal.config.config["server_url"]
    try:
        modal_connection.open_client(modal.Client.from_env, server_url)
    except modal_connection.Hopeless as exc:
        where = " (set by MODAL_SERVER_URL)" if os.environ.get("MODAL_SERVER_URL") else ""
        raise ModalUnreachableError(f"cannot reach Modal{where}: {exc}; check the network "
                                    "connection and retry") from exc
    except Exception as exc:
        raise translate(exc, "connecting to Modal") from exc
    _connected = True


def check_fits(apps: list[plan.App]) -> None:
    """Every app serves at least one model (plan.py keeps only the models that fit)."""
    for app in apps:
        if not app.pools:
            reasons = "; ".join(f"{f.model.key}: {f.reason}" for f in app.skipped)
            raise config.UsageError(f"{app.name} cannot be deployed: no model fits on "
                                    f"{app.gpu.modal_gpu} ({reasons})")


# ## Online preflight: Secrets exist, room for more web endpoints


def required_secrets(apps: list[plan.App]) -> list[str]:
    """`vllm-api-key` always; `huggingface` only when a model to deploy is gated."""
    return list(dict.fromkeys(name for app in apps for name in app.secrets))


_PLACEHOLDERS = {plan.HF_SECRET: "hf_your_token_here", plan.API_KEY_SECRET: "your-secret-key"}


def secret_create_command(name: str, environment: str | None = None, *, force: bool = False) -> str:
    key = plan.SECRET_KEYS[name]
    return (f"uv run modal secret create{' --force' if force else ''}{_env_flag(environment)} "
            f"{name} {key}={_PLACEHOLDERS.get(name, '...')}")


def check_secrets(apps: list[plan.App], environment: str | None) -> None:
    problems = []
    for name in required_secrets(apps):
        key = plan.SECRET_KEYS[name]
        try:
            modal.Secret.from_name(name, environment_name=environment,
                                   required_keys=[key]).hydrate()
        except modal.exception.NotFoundError as exc:
            where = _env_note(environment)
            if key in str(exc):  # it exists, without the key the apps read
                replace = secret_create_command(name, environment, force=True)
                problems.append(f"Modal Secret '{name}' has no {key}{where}; replace it: {replace}")
            else:
                create = secret_create_command(name, environment)
                problems.append(f"Modal Secret '{name}' not found{where}; create it: {create}")
        except Exception as exc:  # mapped to one line
            raise translate(exc, f"checking the Modal Secret '{name}'") from exc
    if problems:
        raise SecretMissingError("\n".join(problems))


def check_adapters_uploaded(apps: list[plan.App], environment: str | None) -> None:
    """vLLM refuses to start when a --lora-modules path is missing: find that out here."""
    wanted = {(p.model.key, a.name, a.path) for app in apps for p in app.pools
              for a in p.model.adapters}
    if not wanted:
        return
    volume = modal.Volume.from_name(plan.ADAPTERS_VOLUME, environment_name=environment)
    problems = []
    for model_key, name, path in sorted(wanted):
        try:
            names = {entry.path.rsplit("/", 1)[-1] for entry in volume.listdir(path)}
        except (modal.exception.NotFoundError, FileNotFoundError):
            names = set()
        except Exception as exc:  # mapped to one line
            raise translate(exc, f"checking the Volume '{plan.ADAPTERS_VOLUME}'") from exc
        if "adapter_config.json" not in names:
            problems.append(
                f"LoRA adapter '{name}' of {model_key} is not uploaded "
                f"({plan.ADAPTERS_VOLUME}:/{path}){_env_note(environment)}; upload it: "
                f"uv run deploy.py --upload-adapter {model_key} {name} DIR")
    if problems:
        raise AdapterMissingError("\n".join(problems))


@dataclass(frozen=True)
class DeployedApp:
    name: str
    containers: int  # running containers of all its functions


def deployed_apps(environment: str | None) -> dict[str, DeployedApp]:
    """Deployed apps of the environment, by name, with their running containers.

    Modal lists them only through `modal.experimental`, which may change: this is the one
    place that calls it, and nothing else sees its types.
    """
    try:
        infos = modal.experimental.list_deployed_apps(environment_name=environment or "")
    except Exception as exc:
        raise translate(exc, "listing deployed apps") from exc
    return {info.name: DeployedApp(info.name, info.containers) for info in infos}


def matrix_app_names(matrix: config.Matrix) -> set[str]:
    return {a.name for a in plan.all_gpu_apps(matrix)} | {
        config.legacy_app_name(f.model.key, f.gpu.key) for f in matrix.legacy_cells()}


def web_endpoints_of(app_name: str, environment: str | None) -> int:
    """The web functions of another deployed app (web methods of classes are not counted)."""
    try:
        objects = modal.experimental.get_app_objects(app_name, environment_name=environment)
        return sum(1 for obj in objects.values()
                   if isinstance(obj, modal.Function) and obj.get_web_url())
    except Exception as exc:
        raise translate(exc, f"counting the web endpoints of {app_name}") from exc


def check_endpoint_limit(matrix: config.Matrix, apps: list[plan.App],
                         environment: str | None) -> None:
    """Deployed web endpoints + the new apps' against the Starter plan's limit.

    Ours have exactly one endpoint each; other apps' web functions are counted.
    Redeploying an app adds nothing, so a redeploy is never refused.
    """
    deployed = deployed_apps(environment)
    new = [a.name for a in apps if a.name not in deployed]
    if not new:
        return
    ours = matrix_app_names(matrix)
    existing = sum(1 if name in ours else web_endpoints_of(name, environment)
                   for name in deployed)
    total = existing + len(new)
    limit = config.STARTER_PLAN_ENDPOINT_LIMIT
    if total > limit:
        raise LimitReachedError(
            f"deploying {', '.join(new)} would make {total} web endpoints{_env_note(environment)} "
            f"({existing} deployed + {len(new)} new), over Modal's Starter limit of {limit}; "
            "stop some (uv run deploy.py --status, then --stop KEY), prefer --gpu apps (one "
            "endpoint serves every model), or pass --ignore-endpoint-limit if your plan allows more"
        )


def preflight(matrix: config.Matrix, apps: list[plan.App], *, environment: str | None,
              ignore_endpoint_limit: bool = False) -> None:
    """The online checks (Secrets, adapters, endpoint limit), once deploy_command has made
    the offline ones (fit, credentials) and connected."""
    check_secrets(apps, environment)
    check_adapters_uploaded(apps, environment)
    if not ignore_endpoint_limit:  # a GPU app is an endpoint too; a redeploy adds none
        check_endpoint_limit(matrix, apps, environment)


# ## Looking up: the endpoint URL of a deployed app


def deploy_flag(app: plan.App) -> str:
    """The command line that deploys this app."""
    return f"uv run deploy.py {'--gpu' if app.kind == 'gpu' else '--model'} {app_key(app)}"


def app_key(app: plan.App) -> str:
    """What names the app on the command line: its GPU key (h100), or gemma-3-12b-l40s."""
    if app.kind == "gpu":
        return app.gpu.key
    return config.legacy_key(app.pools[0].model.key, app.gpu.key)


def web_url(app: plan.App, environment: str | None) -> str:
    """The deployed https URL of the app's one web endpoint; NotDeployedError if none."""
    not_deployed = NotDeployedError(
        f"{app.name} is not deployed{_env_note(environment)}; deploy it: "
        f"{deploy_flag(app)}{_env_flag(environment)}")
    try:
        url = modal.Function.from_name(app.name, plan.WEB_FUNCTION,
                                       environment_name=environment).get_web_url()
    except modal.exception.NotFoundError as exc:
        raise not_deployed from exc
    except Exception as exc:
        raise translate(exc, f"looking up {app.name}") from exc
    if not url:
        raise not_deployed
    return url.rstrip("/")


def endpoint_url(matrix: config.Matrix, key: str, *, environment: str | None = None) -> str:
    """GPU key (h100) or legacy key (gemma-3-12b-l40s) to its deployed https URL.

    For other features (conformance tests, warm-up, benchmarks, LiteLLM config).
    Raises config.UsageError (exit 2) for an unknown key, NotAuthenticatedError
    (exit 4) without a Modal token, NotDeployedError (exit 1) when the app is not
    deployed, and the other errors of this module for Modal failures.
    """
    app = plan.app_for_key(matrix, key)
    require_credentials()
    return web_url(app, environment)


# ## Deploying


@dataclass
class DeployResult:
    app: str
    seconds: float
    url: str = ""
    error: config.UserError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def build_app(matrix: config.Matrix, app: plan.App) -> gpu_pool.Built:
    """The Modal app for a plan, built offline (no RPC until it is deployed)."""
    try:
        if app.kind == "gpu":
            import vllm_gpu_server

            return vllm_gpu_server.build(matrix, app.gpu.key)
        import vllm_server

        return vllm_server.build(matrix, app_key(app))
    except Exception as exc:
        raise translate(exc, f"building {app.name}", building=True) from exc


def deploy_built(built: gpu_pool.Built, environment: str | None) -> DeployResult:
    """Deploy one built app and look up its URL; failures are returned, not raised."""
    name = built.plan.name
    started = time.monotonic()
    try:
        built.app.deploy(name=name, environment_name=environment)
        url = web_url(built.plan, environment)
    except Exception as exc:  # noqa: BLE001 - one app's failure must not stop the others
        error = translate(exc, f"deploying {name}", building=True)
        return DeployResult(name, time.monotonic() - started, error=error)
    clear_failures(built.plan, environment)
    return DeployResult(name, time.monotonic() - started, url)


def clear_failures(app: plan.App, environment: str | None) -> None:
    """A deploy starts clean: the router must not answer 503 from the previous deployment's
    start-up failure. Best effort: a record left behind goes stale within minutes."""
    if app.kind != "gpu":  # only a router consults the records
        return
    try:
        pool_state.Records(environment).clear_failures(app.name, [p.model.key for p in app.pools])
    except Exception:  # noqa: BLE001, S110 - the deploy itself succeeded
        pass


def deploy_many(builts: list[gpu_pool.Built], environment: str | None, console,
                *, concurrency: int = DEPLOY_CONCURRENCY) -> list[DeployResult]:
    """Deploy concurrently, bounded; every app is tried whatever the others do.

    Modal's output manager is one per process and its live displays (object
    trees, spinners) are not safe across concurrent deploys, so it runs in
    quiet mode: image build logs and errors still stream, the spinners do not.
    """
    results: dict[str, DeployResult] = {}
    console.print(f"Deploying {len(builts)} apps, {concurrency} at a time; "
                  "Modal's build logs follow.")
    with modal.enable_output():
        modal.output.OutputManager.get().set_quiet_mode(True)
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="deploy")
        try:
            futures = {pool.submit(deploy_built, b, environment): b.plan.name for b in builts}
            for done, future in enumerate(as_completed(futures), 1):
                result = future.result()
                results[result.app] = result
                mark = "[green]✓[/green]" if result.ok else "[red]✗[/red]"
                verb = "deployed" if result.ok else "failed"
                console.print(f"{mark} {result.app} {verb} after {result.seconds:.0f} s "
                              f"({done}/{len(builts)})")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [results[b.plan.name] for b in builts]


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, soft_wrap=False, emoji=False)
    if not console.is_terminal:
        console.width = 200  # piped: tables keep URLs on one line
    return console


def _raise_failures(failures: list[DeployResult], total: int, verbose: bool) -> None:
    if total == 1:
        raise failures[0].error  # chained to Modal's exception, for --verbose
    if verbose:
        for failure in failures:
            traceback.print_exception(failure.error, file=sys.stderr)
    codes = {r.error.exit_code for r in failures}
    error = DeployFailedError("\n".join(str(r.error) for r in failures)
                              + f"\n{len(failures)} of {total} deploys failed")
    error.exit_code = codes.pop() if len(codes) == 1 else DeployFailedError.exit_code
    raise error from None


def deploy_command(matrix: config.Matrix, apps: list[plan.App], *, environment: str | None,
                   ignore_endpoint_limit: bool = False, verbose: bool = False) -> None:
    """`--gpu`, `--all`, `--model`: preflight, build every app, deploy, report."""
    from rich.markup import escape
    from rich.table import Table

    err = _console(stderr=True)
    out = _console()
    check_fits(apps)  # offline first; then connecting, which shows its own wait if any
    require_credentials()
    with err.status("Preflight: credentials, Secrets, endpoints…"):
        preflight(matrix, apps, environment=environment,
                  ignore_endpoint_limit=ignore_endpoint_limit)
    # Build every app before any deploy: builds register classes in their module's
    # globals, which is safe in sequence, not across threads.
    builts = [build_app(matrix, app) for app in apps]
    if len(builts) == 1:
        with modal.enable_output():  # Modal's own build output and spinners
            results = [deploy_built(builts[0], environment)]
    else:
        results = deploy_many(builts, environment, err)

    failures = [r for r in results if not r.ok]
    if len(results) > 1:
        table = Table(title="Deploy summary", title_justify="left")
        for column in ("app", "result", "URL", "seconds"):
            table.add_column(column, no_wrap=column != "result",
                             justify="right" if column == "seconds" else "left")
        for r in results:
            outcome = ("[green]ok[/green]" if r.ok
                       else f"[red]failed[/red] (exit {r.error.exit_code})")
            table.add_row(r.app, outcome, r.url or "-", f"{r.seconds:.0f}")
        out.print(table)
    else:
        for r in results:
            if r.ok:
                out.print(f"{r.app} deployed in {r.seconds:.0f} s: {escape(r.url)}", soft_wrap=True)
    if failures:
        _raise_failures(failures, len(results), verbose)
    out.print(f"Use it: export LLM_BASE_URL=$(uv run deploy.py --url {app_key(apps[0])}"
              f"{_env_flag(environment)})/v1", soft_wrap=True)


# ## Status: every app of the matrix, deployed or not, and its running containers


@dataclass
class AppStatus:
    app: str
    kind: str
    gpu: str
    deployed: bool
    url: str = ""
    containers: int = 0  # every running container of the app (router and pools)
    pools: dict[str, int | None] = field(default_factory=dict)  # model -> containers
    # What each model's pool recorded (pool_state.py): the GPU its last good start got,
    # and a start-up failure not yet cleared by a good start.
    gpu_actual: dict[str, dict | None] = field(default_factory=dict)
    failures: dict[str, dict | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"app": self.app, "kind": self.kind, "gpu": self.gpu, "deployed": self.deployed,
                "url": self.url or None, "containers": self.containers, "pools": self.pools,
                "gpu_actual": self.gpu_actual, "failures": self.failures}


def pool_containers(app_name: str, model_key: str, environment: str | None) -> int | None:
    """Running containers of one model's GPU pool (None: the pool is not in the deployed app)."""
    cls = modal.Cls.from_name(app_name, gpu_pool.pool_class_name(model_key),
                              environment_name=environment)
    try:
        # A method of an instance is a Function on the class's own service function (a class
        # without parameters uses it as it is: modal/cls.py, _Obj._cached_service_function),
        # so its current stats are the pool's.
        stats = cls().request.get_current_stats()
    except modal.exception.NotFoundError:
        return None
    return stats.num_total_runners


def running_replicas(app: plan.App, environment: str | None) -> dict[str, int | None]:
    """Running GPU replicas per model of a deployed app, counted as --status counts them
    (for --batch's cost estimate); a legacy app's containers are its one model's."""
    try:
        if app.kind == "legacy":
            info = deployed_apps(environment).get(app.name)
            return {app.pools[0].model.key: info.containers if info else 0}
        return {p.model.key: pool_containers(app.name, p.model.key, environment)
                for p in app.pools}
    except Exception as exc:  # a UserError passes through translate unchanged
        raise translate(exc, f"counting the running replicas of {app.name}") from exc


def read_records(environment: str | None) -> dict:
    """Every pool's records (start-up failures, GPUs got): one RPC for all apps."""
    try:
        return pool_state.Records(environment, create=False).read()
    except Exception as exc:
        raise translate(exc, "reading the pools' records") from exc


def app_status(app: plan.App, info, environment: str | None, records: dict) -> AppStatus:
    status = AppStatus(app.name, app.kind, app.gpu.key, info is not None)
    if info is None:
        return status
    models = [p.model.key for p in app.pools]
    status.gpu_actual = {m: _plain_record(records.get(pool_state.gpu_key(app.name, m)))
                         for m in models}
    status.failures = {m: _plain_record(records.get(pool_state.failure_key(app.name, m)))
                       for m in models}
    status.containers = info.containers
    try:
        status.url = web_url(app, environment)
    except NotDeployedError:
        status.url = ""
    if app.kind == "legacy":  # the web function is the GPU container itself
        status.pools = {app.pools[0].model.key: info.containers}
    else:
        status.pools = {p.model.key: pool_containers(app.name, p.model.key, environment)
                        for p in app.pools}
    return status


def _plain_record(record) -> dict | None:
    return dict(record) if isinstance(record, dict) else None


def status(matrix: config.Matrix, environment: str | None) -> list[AppStatus]:
    """Every app of the matrix, deployed or not (status_command has connected first)."""
    apps = plan.all_gpu_apps(matrix) + plan.all_legacy_apps(matrix)
    deployed = deployed_apps(environment)
    records = read_records(environment) if any(a.name in deployed for a in apps) else {}

    def one(app: plan.App) -> AppStatus:
        try:
            return app_status(app, deployed.get(app.name), environment, records)
        except config.UserError:
            raise
        except Exception as exc:
            raise translate(exc, f"looking up {app.name}") from exc

    with ThreadPoolExecutor(max_workers=LOOKUP_CONCURRENCY) as pool:
        return list(pool.map(one, apps))


def status_command(matrix: config.Matrix, *, environment: str | None, as_json: bool) -> None:
    import json

    from rich.table import Table

    require_credentials()  # before the spinner below: connecting shows its own wait if any
    with _console(stderr=True).status("Asking Modal which apps are deployed…"):
        rows = status(matrix, environment)
    if as_json:
        sys.stdout.write(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        return
    table = Table(title=f"Apps of the matrix{_env_note(environment)}", title_justify="left")
    for column in ("app", "deployed", "URL", "containers per model pool"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        pools = ", ".join(f"{m} {'?' if n is None else n}" for m, n in r.pools.items())
        table.add_row(r.app, "[green]yes[/green]" if r.deployed else "no", r.url or "-",
                      pools or "-")
    console = _console()
    console.print(table)
    pools = pool_table(matrix, rows)
    if pools is not None:
        console.print(pools)
    up = sum(r.deployed for r in rows)
    console.print(f"{up} of {len(rows)} apps deployed, "
                  f"{sum(r.containers for r in rows)} containers running.")


def _ago(at) -> str:
    seconds = max(0, int(time.time() - at)) if isinstance(at, int | float) else None
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def gpu_cell(facts: dict | None, asked: str) -> str:
    """What the pool's last good start ran on; flagged when it is not the GPU asked for."""
    from rich.markup import escape

    if not facts:
        return "-"
    text = escape(f"{facts.get('count')}x {facts.get('name')}, driver {facts.get('driver')}, "
                  f"vLLM {facts.get('vllm')} ({_ago(facts.get('at'))})")
    if not pool_state.gpu_matches(asked, str(facts.get("name", ""))):
        text += f" [yellow](asked for {escape(asked)})[/yellow]"
    return text


def pool_table(matrix: config.Matrix, rows: list[AppStatus]):
    """One row per model pool of the deployed apps: containers, GPU got, last failure."""
    from rich.markup import escape
    from rich.table import Table

    deployed = [r for r in rows if r.deployed and r.pools]
    if not deployed:
        return None
    table = Table(title="Model pools of the deployed apps", title_justify="left")
    for column in ("app", "model", "containers", "GPU it runs on", "start-up failure"):
        table.add_column(column, no_wrap=column != "start-up failure")
    for r in deployed:
        asked = matrix.gpus[r.gpu].modal_gpu
        for model, containers in r.pools.items():
            failure = r.failures.get(model)
            table.add_row(r.app, model, "?" if containers is None else str(containers),
                          gpu_cell(r.gpu_actual.get(model), asked),
                          f"[red]{_ago(failure.get('at'))}: {escape(str(failure.get('error')))}"
                          "[/red]" if failure else "-")
    return table


# ## Stopping


def apps_to_stop(matrix: config.Matrix, key: str, deployed: dict[str, DeployedApp],
                 environment: str | None) -> list[plan.App]:
    if key.strip().lower() == "all":
        apps = plan.all_gpu_apps(matrix) + plan.all_legacy_apps(matrix)
        return [a for a in apps if a.name in deployed]
    app = plan.app_for_key(matrix, key)
    if app.name not in deployed:
        raise NotDeployedError(f"{app.name} is not deployed{_env_note(environment)}; "
                               "nothing to stop")
    return [app]


def stop_app(name: str, environment: str | None) -> None:
    try:
        modal.App.lookup(name, environment_name=environment).stop()
    except modal.exception.NotFoundError as exc:
        raise NotDeployedError(f"{name} is not deployed{_env_note(environment)}") from exc
    except Exception as exc:
        raise translate(exc, f"stopping {name}") from exc


def stop_command(matrix: config.Matrix, key: str, *, environment: str | None, yes: bool) -> None:
    import typer

    out = _console()
    if key.strip().lower() != "all":
        plan.app_for_key(matrix, key)  # an unknown key is a usage error, before any RPC
    require_credentials()
    deployed = deployed_apps(environment)
    apps = apps_to_stop(matrix, key, deployed, environment)
    if not apps:
        out.print(f"No app of the matrix is deployed{_env_note(environment)}; nothing to stop.")
        return
    listed = ", ".join(f"{a.name} ({deployed[a.name].containers} containers)" for a in apps)
    if not yes:
        question = (f"Stop {listed}{_env_note(environment)}? Their endpoints go away "
                    "until deployed again")
        try:
            confirmed = typer.confirm(question, default=False)
        except typer.Abort:
            confirmed = False
        if not confirmed:
            raise config.UserError("not confirmed; nothing stopped (--yes skips the question)")
    for app in apps:
        stop_app(app.name, environment)
        out.print(f"stopped {app.name}")


def operate(matrix: config.Matrix, *, url: str | None = None, status: bool = False,
            stop: str | None = None, yes: bool = False, as_json: bool = False,
            environment: str | None = None) -> None:
    """`--url KEY`, `--status`, `--stop KEY|all` (deploy.py checked that only one is set)."""
    if url:
        # The URL alone on stdout: export LLM_BASE_URL=$(uv run deploy.py --url h100)/v1
        sys.stdout.write(endpoint_url(matrix, url, environment=environment) + "\n")
    elif status:
        status_command(matrix, environment=environment, as_json=as_json)
    elif stop:
        stop_command(matrix, stop, environment=environment, yes=yes)
