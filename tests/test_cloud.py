"""Cloud operations (deploy, --url, --status, --stop) with the Modal SDK patched at its boundary.

`FakeModal` stands in for a workspace: which apps are deployed, which Secrets
exist, what each call raises. Every SDK entry point cloud.py uses is a
MagicMock around it, so the tests assert the exact calls (the modal.App object,
its name, the environment) as well as each command's output and exit code.
Nothing here touches the network or the real home directory (see conftest).
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from unittest import mock

import modal
import modal.exception
import modal.experimental
import modal_fakes
import pytest
from modal.types import FunctionCurrentStats
from typer.testing import CliRunner

import cloud
import config
import deploy
import gateway_server
import plan

ROOT = Path(__file__).resolve().parent.parent
MATRIX = config.load()
GPUS = ["l40s", "a100", "h100", "h200", "b200"]
POOLS = {"gemma-3-12b": "Pool_gemma_3_12b", "gemma-3-27b": "Pool_gemma_3_27b",
         "qwen3-vl-30b": "Pool_qwen3_vl_30b"}
NO_TOKEN = ("Error: not logged in to Modal (no token in MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or ")
HF_CREATE = "uv run modal secret create huggingface HF_TOKEN=hf_your_token_here"
KEY_CREATE = "uv run modal secret create vllm-api-key API_KEY=your-secret-key"


REAL_SECRET_FROM_NAME = modal.Secret.from_name


def preflight_secrets(fake) -> list:
    """Secret.from_name calls of the preflight (the builds make some too, without required_keys)."""
    return [c for c in fake.mocks.secret_from_name.call_args_list if "required_keys" in c.kwargs]


def url_of(app: str) -> str:
    return f"https://ws--{app}-serve.modal.run"


class FakeModal:
    """A Modal workspace as the SDK would report it."""

    def __init__(self):
        self.deployed: dict[str, int] = {}  # app name -> running containers
        self.web_functions: dict[str, int] = {}  # other apps: how many web functions
        self.secrets = {"huggingface": ["HF_TOKEN"], "vllm-api-key": ["API_KEY"]}
        self.deploy_errors: dict[str, BaseException] = {}
        self.list_error: BaseException | None = None
        self.runners: dict[tuple[str, str], int] = {}  # (app, pool class) -> containers

        # The pools' records (pool_state.Records): a modal.Dict of the fakes.
        self.workspace = modal_fakes.Workspace()

    # modal.App.deploy(self, *, name=None, environment_name=None, tag="", ...)
    def deploy_app(self, app, *, name=None, environment_name=None, tag=""):
        assert isinstance(app, modal.App), app
        if name in self.deploy_errors:
            raise self.deploy_errors[name]
        self.deployed[name] = 0
        return app

    @property
    def records(self) -> dict:
        return self.workspace.dict_from_name(plan.STATE_DICT, create_if_missing=True).data

    # modal.Function.from_name(app_name, name, *, environment_name=None)
    def function_from_name(self, app_name, name, *, environment_name=None):
        function = mock.MagicMock(name=f"Function {app_name}/{name}")

        def get_web_url():
            if app_name not in self.deployed:
                raise modal.exception.NotFoundError(f"App '{app_name}' not found")
            return url_of(app_name) if name == "serve" else None

        function.get_web_url.side_effect = get_web_url
        return function

    # modal.Secret.from_name(name, *, environment_name=None, required_keys=[])
    def secret_from_name(self, name, *, environment_name=None, required_keys=()):
        if not required_keys:  # building an app: the real lazy reference, no RPC
            return REAL_SECRET_FROM_NAME(name, environment_name=environment_name)
        secret = mock.MagicMock(name=f"Secret {name}")

        def hydrate():
            if name not in self.secrets:
                raise modal.exception.NotFoundError(f"Secret '{name}' not found")
            missing = [k for k in required_keys if k not in self.secrets[name]]
            if missing:
                raise modal.exception.NotFoundError(f"Secret is missing key(s): {missing[0]}")
            return secret

        secret.hydrate.side_effect = hydrate
        return secret

    # modal.experimental.list_deployed_apps(environment_name="")
    def list_deployed_apps(self, environment_name=""):
        if self.list_error:
            raise self.list_error
        return [modal.experimental.AppInfo(f"ap-{n}", n, c) for n, c in self.deployed.items()]

    # modal.experimental.get_app_objects(app_name, *, environment_name=None)
    def get_app_objects(self, app_name, *, environment_name=None):
        objects = {}
        for i in range(self.web_functions.get(app_name, 0) + 1):  # +1: one non-web function
            function = mock.MagicMock(spec=modal.Function)
            function.get_web_url.return_value = url_of(f"{app_name}-{i}") if i else None
            objects[f"f{i}"] = function
        return objects

    # modal.App.lookup(name, *, environment_name=None)
    def app_lookup(self, name, *, environment_name=None):
        if name not in self.deployed:
            raise modal.exception.NotFoundError(f"App '{name}' not found")
        app = mock.MagicMock(name=f"App {name}")
        app.stop.side_effect = lambda: self.deployed.pop(name)
        return app

    # modal.Cls.from_name(app_name, name, *, environment_name=None)
    def cls_from_name(self, app_name, name, *, environment_name=None):
        cls = mock.MagicMock(name=f"Cls {app_name}/{name}")
        method = cls.return_value.request  # Cls(...).request: a Function on the pool

        def stats():
            if (app_name, name) not in self.runners:
                raise modal.exception.NotFoundError(f"Cls '{name}' not found")
            return FunctionCurrentStats(0, self.runners[app_name, name], 0, 0)

        method.get_current_stats.side_effect = stats
        return cls


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-testtokenid0001")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-testtokensecret0002")


@pytest.fixture
def sdk():
    """The SDK patched at the calls cloud.py makes; yields (fake workspace, mocks)."""
    fake = FakeModal()
    deploy_app = mock.MagicMock(side_effect=fake.deploy_app)

    def deploy(app, **kwargs):  # a method: the mock records the app as its first argument
        return deploy_app(app, **kwargs)

    with (
        mock.patch.object(modal.App, "deploy", deploy),
        mock.patch.object(modal.Dict, "from_name",
                          side_effect=fake.workspace.dict_from_name) as dict_from_name,
        mock.patch.object(modal.Function, "from_name",
                          side_effect=fake.function_from_name) as function_from_name,
        mock.patch.object(modal.Secret, "from_name", side_effect=fake.secret_from_name) as secret,
        mock.patch("modal.experimental.list_deployed_apps",
                   side_effect=fake.list_deployed_apps) as list_apps,
        mock.patch("modal.experimental.get_app_objects",
                   side_effect=fake.get_app_objects) as app_objects,
        mock.patch.object(modal.App, "lookup", side_effect=fake.app_lookup) as lookup,
        mock.patch.object(modal.Cls, "from_name", side_effect=fake.cls_from_name) as cls,
        mock.patch("modal.enable_output", wraps=modal.enable_output) as enable_output,
        mock.patch.object(modal.Client, "from_env"),  # cloud.connect: the connection opens
    ):
        fake.mocks = mock.Mock(deploy_app=deploy_app, dict_from_name=dict_from_name,
                               function_from_name=function_from_name,
                               secret_from_name=secret, list_deployed_apps=list_apps,
                               get_app_objects=app_objects, app_lookup=lookup,
                               cls_from_name=cls, enable_output=enable_output)
        yield fake


def run(*args: str, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(deploy.cli, list(args), input=input,
                              env={"COLUMNS": "80", **(env or {})})


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def deployed_names(fake: FakeModal) -> list[str]:
    return [c.kwargs["name"] for c in fake.mocks.deploy_app.call_args_list]


# ## Deploy: --gpu, --all, --model


def test_deploy_gpu_deploys_the_built_app_through_the_sdk(token, sdk):
    result = run("--gpu", "H100")
    assert result.exit_code == 0, result.output
    [call] = sdk.mocks.deploy_app.call_args_list
    (app,) = call.args
    assert isinstance(app, modal.App) and app.name == "vllm-h100"
    assert call.kwargs == {"name": "vllm-h100", "environment_name": None}
    sdk.mocks.enable_output.assert_called_once_with()  # Modal's own build output stays on
    # Preflight: both Secrets (Gemma is gated), with the key each app reads.
    assert preflight_secrets(sdk) == [
        mock.call("vllm-api-key", environment_name=None, required_keys=["API_KEY"]),
        mock.call("huggingface", environment_name=None, required_keys=["HF_TOKEN"]),
    ]
    sdk.mocks.list_deployed_apps.assert_called_once_with(environment_name="")  # endpoint count
    assert f"vllm-h100 deployed in 0 s: {url_of('vllm-h100')}" in result.stdout
    assert "export LLM_BASE_URL=$(uv run deploy.py --url h100)/v1" in result.stdout


def test_environment_from_flag_or_modal_environment_reaches_every_call(token, sdk):
    for args, env in ((["--gpu", "l40s", "--env", "staging"], None),
                      (["--gpu", "l40s"], {"MODAL_ENVIRONMENT": "staging"})):
        sdk.deployed.clear()
        for recorded in (sdk.mocks.deploy_app, sdk.mocks.secret_from_name,
                         sdk.mocks.function_from_name):
            recorded.reset_mock()
        result = run(*args, env=env)
        assert result.exit_code == 0, result.output
        assert sdk.mocks.deploy_app.call_args.kwargs == {"name": "vllm-l40s",
                                                         "environment_name": "staging"}
        assert sdk.mocks.function_from_name.call_args == mock.call(
            "vllm-l40s", "serve", environment_name="staging")
        assert len(preflight_secrets(sdk)) == 2
        for call in preflight_secrets(sdk):
            assert call.kwargs["environment_name"] == "staging"
        assert "--url l40s --env staging)/v1" in result.stdout


def test_deploy_all_keeps_going_past_a_failure_and_summarises(token, sdk):
    sdk.deploy_errors["vllm-h200"] = modal.exception.ImageBuildError(
        "Image build for im-123 failed with the exception: pip exited 1", "im-123")
    result = run("--all", env={"COLUMNS": "200"})
    assert result.exit_code == 8, result.output  # the one failure's own code
    # Every app was built before the (concurrent) deploys, each its own modal.App.
    apps = [c.args[0] for c in sdk.mocks.deploy_app.call_args_list]
    assert sorted(a.name for a in apps) == sorted(f"vllm-{g}" for g in GPUS)
    assert len({id(a) for a in apps}) == 5
    assert sorted(deployed_names(sdk)) == sorted(f"vllm-{g}" for g in GPUS)
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.stdout.splitlines()
            if line.startswith("│") and "vllm-" in line}
    assert {app: r[0] for app, r in rows.items()} == {
        "vllm-l40s": "ok", "vllm-a100": "ok", "vllm-h100": "ok",
        "vllm-h200": "failed (exit 8)", "vllm-b200": "ok"}
    assert rows["vllm-h100"][1] == url_of("vllm-h100")
    assert rows["vllm-h200"][1] == "-"
    assert all(r[2].isdigit() for r in rows.values())  # seconds
    assert error_lines(result) == [
        ("Error: deploying vllm-h200 failed: Image build for im-123 failed with the exception: "
        "pip exited 1 (Modal's build output is above; --verbose shows the traceback)"),
        "Error: 1 of 5 deploys failed",
    ]
    assert "Traceback" not in result.output


def test_deploy_all_with_failures_of_different_kinds_exits_1(token, sdk):
    sdk.deploy_errors["vllm-l40s"] = modal.exception.ResourceExhaustedError("GPU quota reached")
    sdk.deploy_errors["vllm-b200"] = modal.exception.ConnectionError("connection reset")
    result = run("--all")
    assert result.exit_code == 1, result.output
    assert error_lines(result)[-1] == "Error: 2 of 5 deploys failed"
    assert len(sdk.mocks.deploy_app.call_args_list) == 5


def test_deploy_legacy_model_counts_endpoints_against_the_starter_limit(token, sdk):
    # 6 of our apps + another app with 2 web endpoints: 8 deployed, one more is too many.
    sdk.deployed.update({f"vllm-{g}": 0 for g in GPUS})
    sdk.deployed["vllm-gemma-3-27b-h100"] = 1
    sdk.deployed["my-other-app"] = 0
    sdk.web_functions["my-other-app"] = 2
    result = run("--model", "gemma-3-12b-l40s")
    assert result.exit_code == 7, result.output
    assert error_lines(result) == [
        ("Error: deploying vllm-gemma-3-12b-l40s would make 9 web endpoints (8 deployed + 1 new), "
        "over Modal's Starter limit of 8; stop some (uv run deploy.py --status, then --stop KEY), "
        "prefer --gpu apps (one endpoint serves every model), or pass --ignore-endpoint-limit if "
        "your plan allows more")]
    sdk.mocks.deploy_app.assert_not_called()
    sdk.mocks.list_deployed_apps.assert_called_once_with(environment_name="")
    sdk.mocks.get_app_objects.assert_called_once_with("my-other-app", environment_name=None)

    result = run("--model", "gemma-3-12b-l40s", "--ignore-endpoint-limit")
    assert result.exit_code == 0, result.output
    (app,) = sdk.mocks.deploy_app.call_args.args
    assert app.name == "vllm-gemma-3-12b-l40s"
    assert deployed_names(sdk) == ["vllm-gemma-3-12b-l40s"]


def test_deploy_all_counts_endpoints_too(token, sdk):
    """A GPU app is a web endpoint as well: 5 new ones beside 4 of another app's are 9."""
    sdk.deployed["their-app"] = 0
    sdk.web_functions["their-app"] = 4
    result = run("--all")
    assert result.exit_code == 7, result.output
    assert error_lines(result)[0].startswith(
        "Error: deploying vllm-l40s, vllm-a100, vllm-h100, vllm-h200, vllm-b200 would make 9 web "
        "endpoints (4 deployed + 5 new)")
    sdk.mocks.deploy_app.assert_not_called()
    result = run("--all", "--ignore-endpoint-limit")
    assert result.exit_code == 0, result.output
    assert sorted(deployed_names(sdk)) == sorted(f"vllm-{g}" for g in GPUS)


def test_redeploying_a_legacy_app_adds_no_endpoint(token, sdk):
    sdk.deployed.update({f"vllm-{g}": 0 for g in GPUS})
    sdk.deployed.update({"vllm-gemma-3-12b-l40s": 0, "vllm-gemma-3-12b-a100": 0,
                         "vllm-gemma-3-12b-h100": 0})
    result = run("--model", "gemma-3-12b-l40s")
    assert result.exit_code == 0, result.output
    assert deployed_names(sdk) == ["vllm-gemma-3-12b-l40s"]


def test_a_redeploy_is_never_refused_even_over_the_limit(token, sdk):
    # A paid plan allows more than 8: 10 endpoints deployed; redeploying adds none.
    sdk.deployed.update({f"vllm-{g}": 0 for g in GPUS})
    sdk.deployed["vllm-gemma-3-12b-l40s"] = 0
    sdk.deployed["other"] = 0
    sdk.web_functions["other"] = 4
    result = run("--model", "gemma-3-12b-l40s")
    assert result.exit_code == 0, result.output
    assert deployed_names(sdk) == ["vllm-gemma-3-12b-l40s"]
    sdk.mocks.get_app_objects.assert_not_called()  # nothing new: nothing to count


def test_a_model_that_is_not_gated_needs_no_huggingface_secret(token, sdk):
    del sdk.secrets["huggingface"]
    result = run("--model", "qwen3-vl-30b-h100")
    assert result.exit_code == 0, result.output
    assert [c.args for c in preflight_secrets(sdk)] == [("vllm-api-key",)]


# ## Preflight: offline checks first, then Secrets


@pytest.mark.parametrize("args", [["--gpu", "h100"], ["--all"], ["--model", "gemma-3-12b-l40s"],
                                  ["--url", "h100"], ["--status"], ["--stop", "all"]])
def test_no_credentials_is_one_line_before_any_modal_call(sdk, args):
    result = run(*args)
    assert result.exit_code == 4, result.output
    [line] = error_lines(result)
    assert line.startswith(NO_TOKEN) and line.endswith("; run `uv run modal token new`"), line
    assert result.stdout == ""
    for name in ("deploy_app", "secret_from_name", "function_from_name", "list_deployed_apps",
                 "app_lookup"):
        getattr(sdk.mocks, name).assert_not_called()


def test_a_token_in_the_modal_profile_file_counts(sdk, monkeypatch):
    monkeypatch.setattr(modal.config, "_user_config",
                        {"default": {"token_id": "ak-x1y2z3w4", "token_secret": "as-x1y2z3w4"}})
    monkeypatch.setattr(modal.config, "_profile", "default")
    result = run("--gpu", "h100")
    assert result.exit_code == 0, result.output


def test_the_fit_check_runs_before_credentials(sdk, tmp_path):
    matrix_file = tmp_path / "models.yaml"
    text = (ROOT / "models.yaml").read_text()
    matrix_file.write_text(text.replace("l40s: {modal_gpu: L40S, vram_gb: 48",
                                        "l40s: {modal_gpu: L40S, vram_gb: 1"))
    result = run("--gpu", "l40s", "--config", str(matrix_file))  # and no token
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert line.startswith("Error: vllm-l40s cannot be deployed: no model fits on L40S "
                           "(gemma-3-12b: needs"), line


@pytest.mark.parametrize(("missing", "lines"), [
    (["huggingface"], [f"Error: Modal Secret 'huggingface' not found; create it: {HF_CREATE}"]),
    (["huggingface", "vllm-api-key"], [
        f"Error: Modal Secret 'vllm-api-key' not found; create it: {KEY_CREATE}",
        f"Error: Modal Secret 'huggingface' not found; create it: {HF_CREATE}"]),
])
def test_missing_secrets_print_the_exact_create_command(token, sdk, missing, lines):
    for name in missing:
        del sdk.secrets[name]
    result = run("--gpu", "h100")
    assert result.exit_code == 6, result.output
    assert error_lines(result) == lines
    sdk.mocks.deploy_app.assert_not_called()


def test_missing_secret_command_names_the_environment(token, sdk):
    del sdk.secrets["vllm-api-key"]
    result = run("--gpu", "h100", "--env", "dev")
    assert result.exit_code == 6, result.output
    assert error_lines(result) == [
        ("Error: Modal Secret 'vllm-api-key' not found in environment 'dev'; create it: "
        "uv run modal secret create --env dev vllm-api-key API_KEY=your-secret-key")]


def test_a_secret_without_its_key_says_how_to_replace_it(token, sdk):
    sdk.secrets["huggingface"] = ["HF_TOKN"]
    result = run("--gpu", "h100")
    assert result.exit_code == 6, result.output
    assert error_lines(result) == [
        ("Error: Modal Secret 'huggingface' has no HF_TOKEN; replace it: "
        "uv run modal secret create --force huggingface HF_TOKEN=hf_your_token_here")]


# ## Every expected Modal failure: one line, its own exit code


@pytest.mark.parametrize(("exc", "code", "line"), [
    (modal.exception.AuthError("Token is invalid"), 4,
     ("Error: deploying vllm-h100: Modal rejected the credentials (Token is invalid); "
     "run `uv run modal token new`")),
    (modal.exception.PermissionDeniedError("no access to environment"), 4,
     ("Error: deploying vllm-h100: Modal denied permission (no access to environment); check the "
     "token's workspace and environment (`uv run modal token new` to switch)")),
    (modal.exception.ConnectionError("Could not connect to the Modal server."), 5,
     ("Error: deploying vllm-h100: cannot reach Modal (Could not connect to the Modal server.); "
     "check the network connection and retry")),
    (modal.exception.ServiceError("Deadline Exceeded"), 5,
     ("Error: deploying vllm-h100: cannot reach Modal (Deadline Exceeded); check the network "
     "connection and retry")),
    (socket.gaierror(-3, "Temporary failure in name resolution"), 5,
     ("Error: deploying vllm-h100: cannot reach Modal ([Errno -3] Temporary failure in name "
     "resolution); check the network connection and retry")),
    (modal.exception.ResourceExhaustedError("GPU quota exceeded"), 7,
     ("Error: deploying vllm-h100: a Modal limit was reached (GPU quota exceeded); stop apps you "
     "do not need (uv run deploy.py --status, then --stop KEY) or raise your plan's limits")),
    (modal.exception.InvalidError("Workspace web endpoint limit reached (8)"), 7,
     ("Error: deploying vllm-h100: a Modal limit was reached (Workspace web endpoint limit "
     "reached (8)); stop apps you do not need (uv run deploy.py --status, then --stop KEY) or "
     "raise your plan's limits")),
    (modal.exception.ImageBuildError("Image build failed\npip exited 1", "im-1"), 8,
     ("Error: deploying vllm-h100 failed: Image build failed pip exited 1 (Modal's build output "
     "is above; --verbose shows the traceback)")),
    (modal.exception.InvalidError("Function serve has an invalid config"), 8,
     ("Error: deploying vllm-h100 failed: Function serve has an invalid config (Modal's build "
     "output is above; --verbose shows the traceback)")),
    (modal.exception.NotFoundError("Environment 'x' not found"), 1,
     "Error: deploying vllm-h100: not found on Modal (Environment 'x' not found)"),
])
def test_modal_failures_while_deploying(token, sdk, exc, code, line):
    sdk.deploy_errors["vllm-h100"] = exc
    result = run("--gpu", "h100")
    assert result.exit_code == code, result.output
    assert error_lines(result) == [line]
    assert "Traceback" not in result.output


def test_verbose_shows_the_traceback(token, sdk):
    sdk.deploy_errors["vllm-h100"] = modal.exception.AuthError("Token is invalid")
    result = run("--gpu", "h100", "--verbose")
    assert result.exit_code == 4, result.output
    assert "Traceback (most recent call last)" in result.stderr
    assert "modal.exception.AuthError: Token is invalid" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: deploying vllm-h100: ")


def test_verbose_shows_each_failed_deploy_of_all(token, sdk):
    sdk.deploy_errors["vllm-a100"] = modal.exception.ImageBuildError("build 1 failed", "im-1")
    sdk.deploy_errors["vllm-b200"] = modal.exception.ImageBuildError("build 2 failed", "im-2")
    result = run("--all", "--verbose")
    assert result.exit_code == 8, result.output
    assert "modal.exception.ImageBuildError: build 1 failed" in result.stderr
    assert "modal.exception.ImageBuildError: build 2 failed" in result.stderr


def test_keys_in_modal_messages_are_masked(token, sdk, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "super-secret-value-123")
    sdk.deploy_errors["vllm-h100"] = modal.exception.AuthError(
        "token as-abcdef123456 rejected; key super-secret-value-123; hf_abcdefghijkl leaked")
    result = run("--gpu", "h100")
    assert result.exit_code == 4, result.output
    for secret in ("as-abcdef123456", "super-secret-value-123", "hf_abcdefghijkl",
                   "testtokensecret"):
        assert secret not in result.output
    assert "token as-*** rejected; key ***; hf_*** leaked" in result.output


# ## --url: the URL alone on stdout


@pytest.mark.parametrize(("key", "app"), [("h100", "vllm-h100"),
                                          ("gemma-3-12b-l40s", "vllm-gemma-3-12b-l40s")])
def test_url_prints_the_url_alone(token, sdk, key, app):
    sdk.deployed[app] = 0
    result = run("--url", key)
    assert result.exit_code == 0, result.output
    assert result.stdout == url_of(app) + "\n"
    assert result.stderr == ""
    sdk.mocks.function_from_name.assert_called_once_with(app, "serve", environment_name=None)


def test_url_of_an_app_not_deployed(token, sdk):
    result = run("--url", "h100", "--env", "prod")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert error_lines(result) == [
        ("Error: vllm-h100 is not deployed in environment 'prod'; deploy it: "
        "uv run deploy.py --gpu h100 --env prod")]
    result = run("--url", "gemma-3-27b-b200")
    assert error_lines(result) == [
        ("Error: vllm-gemma-3-27b-b200 is not deployed; deploy it: "
        "uv run deploy.py --model gemma-3-27b-b200")]


def test_url_when_modal_is_unreachable(token, sdk):
    sdk.mocks.function_from_name.side_effect = modal.exception.ConnectionError("timed out")
    result = run("--url", "h100")
    assert result.exit_code == 5, result.output
    assert error_lines(result) == [("Error: looking up vllm-h100: cannot reach Modal (timed out); "
                                   "check the network connection and retry")]


def test_endpoint_url_contract(token, sdk):
    sdk.deployed["vllm-a100"] = 0
    assert cloud.endpoint_url(MATRIX, "A100") == url_of("vllm-a100")
    assert cloud.endpoint_url(MATRIX, "a100", environment="main") == url_of("vllm-a100")
    assert sdk.mocks.function_from_name.call_args == mock.call(
        "vllm-a100", "serve", environment_name="main")
    with pytest.raises(cloud.NotDeployedError) as not_deployed:
        cloud.endpoint_url(MATRIX, "gemma-3-12b-h100")
    assert not_deployed.value.exit_code == 1
    assert isinstance(not_deployed.value, config.UserError)
    with pytest.raises(config.UsageError):
        cloud.endpoint_url(MATRIX, "tpu")


# ## --status


def test_status_table_and_json(token, sdk):
    sdk.deployed.update({"vllm-h100": 3, "vllm-gemma-3-12b-l40s": 1, "someone-else": 4})
    sdk.runners.update({("vllm-h100", "Pool_gemma_3_12b"): 1,
                        ("vllm-h100", "Pool_gemma_3_27b"): 1})  # qwen's pool: not found
    result = run("--status", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["app"]: row for row in json.loads(result.stdout)}
    assert len(rows) == 5 + 15  # every app of the matrix, deployed or not
    nothing = {"gemma-3-12b": None, "gemma-3-27b": None, "qwen3-vl-30b": None}
    assert rows["vllm-h100"] == {
        "app": "vllm-h100", "kind": "gpu", "gpu": "h100", "deployed": True,
        "url": url_of("vllm-h100"), "containers": 3,
        "pools": {"gemma-3-12b": 1, "gemma-3-27b": 1, "qwen3-vl-30b": None},
        "gpu_actual": nothing, "failures": nothing}  # no pool has reported yet
    assert rows["vllm-gemma-3-12b-l40s"]["pools"] == {"gemma-3-12b": 1}
    assert rows["vllm-a100"] == {"app": "vllm-a100", "kind": "gpu", "gpu": "a100",
                                 "deployed": False, "url": None, "containers": 0, "pools": {},
                                 "gpu_actual": {}, "failures": {}}
    sdk.mocks.list_deployed_apps.assert_called_once_with(environment_name="")
    assert sorted(c.args for c in sdk.mocks.cls_from_name.call_args_list) == [
        ("vllm-h100", cls) for cls in sorted(POOLS.values())]
    for call in sdk.mocks.cls_from_name.call_args_list:
        assert call.kwargs == {"environment_name": None}

    result = run("--status", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    h100 = next(line for line in result.stdout.splitlines() if "vllm-h100 " in line)
    assert [c.strip() for c in h100.split("│")[1:-1]] == [
        "vllm-h100", "yes", url_of("vllm-h100"), "gemma-3-12b 1, gemma-3-27b 1, qwen3-vl-30b ?"]
    a100 = next(line for line in result.stdout.splitlines() if "vllm-a100 " in line)
    assert [c.strip() for c in a100.split("│")[1:-1]] == ["vllm-a100", "no", "-", "-"]
    assert "2 of 20 apps deployed, 4 containers running." in result.stdout


H200 = {"name": "NVIDIA H200", "count": 1, "driver": "580.82.07", "vllm": "0.33.0"}


def test_status_shows_the_gpu_each_pool_got_and_its_start_up_failure(token, sdk):
    now = time.time()
    sdk.deployed.update({"vllm-h100": 2, "vllm-l40s": 1})
    sdk.runners.update({("vllm-h100", "Pool_gemma_3_12b"): 1, ("vllm-l40s", "Pool_gemma_3_12b"): 1})
    sdk.records.update({
        "gpu:vllm-h100:gemma-3-12b": {**H200, "at": now - 7200},  # Modal gave an H200
        "gpu:vllm-l40s:gemma-3-12b": {**H200, "name": "NVIDIA L40S", "at": now - 60},
        "failure:vllm-h100:gemma-3-27b": {"error": "vLLM exited with code 1 before it was "
                                                   "ready", "at": now - 180},
    })
    result = run("--status", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["app"]: row for row in json.loads(result.stdout)}
    assert rows["vllm-h100"]["gpu_actual"]["gemma-3-12b"] == {**H200, "at": now - 7200}
    assert rows["vllm-h100"]["failures"]["gemma-3-27b"]["error"].startswith("vLLM exited")
    assert rows["vllm-h100"]["failures"]["gemma-3-12b"] is None
    sdk.mocks.dict_from_name.assert_called_once_with(plan.STATE_DICT, environment_name=None,
                                                     create_if_missing=False)

    result = run("--status", env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    cells = {tuple(c.strip() for c in line.split("│")[1:3]): [c.strip() for c in
                                                              line.split("│")[3:-1]]
             for line in result.stdout.splitlines() if line.count("│") == 6}
    assert cells["vllm-h100", "gemma-3-12b"] == [
        "1", "1x NVIDIA H200, driver 580.82.07, vLLM 0.33.0 (2 h ago) (asked for H100)", "-"]
    assert cells["vllm-h100", "gemma-3-27b"] == [
        "?", "-", "3 min ago: vLLM exited with code 1 before it was ready"]
    assert cells["vllm-l40s", "gemma-3-12b"][1] == (
        "1x NVIDIA L40S, driver 580.82.07, vLLM 0.33.0 (1 min ago)")


def test_a_deploy_clears_the_apps_start_up_failures(token, sdk):
    sdk.records.update({"failure:vllm-h100:gemma-3-27b": {"error": "x", "at": time.time()},
                        "failure:vllm-l40s:gemma-3-27b": {"error": "x", "at": time.time()},
                        "gpu:vllm-h100:gemma-3-27b": H200})
    result = run("--gpu", "h100")
    assert result.exit_code == 0, result.output
    assert sorted(sdk.records) == ["failure:vllm-l40s:gemma-3-27b", "gpu:vllm-h100:gemma-3-27b"]


def test_status_when_modal_is_unreachable(token, sdk):
    sdk.list_error = modal.exception.ConnectionError("Could not connect to the Modal server.")
    result = run("--status")
    assert result.exit_code == 5, result.output
    assert error_lines(result) == [
        ("Error: listing deployed apps: cannot reach Modal (Could not connect to the Modal "
        "server.); check the network connection and retry")]


def test_status_with_a_rejected_token(token, sdk):
    sdk.list_error = modal.exception.AuthError("Invalid token")
    result = run("--status", "--env", "x")
    assert result.exit_code == 4, result.output
    sdk.mocks.list_deployed_apps.assert_called_once_with(environment_name="x")


# ## --stop


def test_stop_asks_first_and_n_aborts(token, sdk):
    sdk.deployed["vllm-h100"] = 2
    result = run("--stop", "h100", input="n\n")
    assert result.exit_code == 1, result.output
    assert "Stop vllm-h100 (2 containers)? Their endpoints go away until deployed again" in (
        result.output)
    assert error_lines(result) == [
        "Error: not confirmed; nothing stopped (--yes skips the question)"]
    sdk.mocks.app_lookup.assert_not_called()
    assert "vllm-h100" in sdk.deployed


def test_stop_confirmed_or_yes(token, sdk):
    sdk.deployed["vllm-h100"] = 2
    result = run("--stop", "h100", input="y\n")
    assert result.exit_code == 0, result.output
    sdk.mocks.app_lookup.assert_called_once_with("vllm-h100", environment_name=None)
    assert "vllm-h100" not in sdk.deployed
    assert "stopped vllm-h100" in result.stdout

    sdk.deployed["vllm-gemma-3-12b-l40s"] = 1
    result = run("--stop", "gemma-3-12b-l40s", "--yes", "--env", "dev")
    assert result.exit_code == 0, result.output
    assert "Stop " not in result.output  # no question asked
    assert sdk.mocks.app_lookup.call_args == mock.call("vllm-gemma-3-12b-l40s",
                                                       environment_name="dev")
    assert sdk.deployed == {}


def test_stop_all_stops_every_deployed_app_of_the_matrix_only(token, sdk):
    sdk.deployed.update({"vllm-l40s": 0, "vllm-b200": 1, "vllm-qwen3-vl-30b-h200": 0,
                         "someone-else": 3})
    result = run("--stop", "all", "-y")
    assert result.exit_code == 0, result.output
    assert [c.args for c in sdk.mocks.app_lookup.call_args_list] == [
        ("vllm-l40s",), ("vllm-b200",), ("vllm-qwen3-vl-30b-h200",)]
    assert sdk.deployed == {"someone-else": 3}


def test_stop_what_is_not_deployed(token, sdk):
    result = run("--stop", "h100", "--yes")
    assert result.exit_code == 1, result.output
    assert error_lines(result) == ["Error: vllm-h100 is not deployed; nothing to stop"]
    result = run("--stop", "all")
    assert result.exit_code == 0, result.output
    assert "No app of the matrix is deployed; nothing to stop." in result.stdout
    result = run("--stop", "tpu")
    assert result.exit_code == 2, result.output
    sdk.mocks.app_lookup.assert_not_called()


def test_stop_failure_is_one_line(token, sdk):
    sdk.deployed["vllm-h100"] = 0
    sdk.mocks.app_lookup.side_effect = modal.exception.PermissionDeniedError("read-only token")
    result = run("--stop", "h100", "--yes")
    assert result.exit_code == 4, result.output
    assert error_lines(result) == [
        ("Error: stopping vllm-h100: Modal denied permission (read-only token); check the "
        "token's workspace and environment (`uv run modal token new` to switch)")]


# ## The CLI around it


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "h100", "--status"], "choose one of --url, --status"),
    (["--stop", "all", "--gpu", "h100"], "choose one of --gpu, --stop"),
    (["--status", "--dry-run"], "Error: --dry-run goes with --gpu, --all, --model or --batch"),
    (["--url", "tpu"], "Error: unknown key 'tpu'; expected a GPU key"),
])
def test_usage_errors(sdk, args, message):
    result = run(*args, env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


def test_exit_codes_are_documented_in_the_epilog():
    codes = {cls.exit_code for cls in (
        config.UserError, config.UsageError, config.ConfigError, cloud.NotDeployedError,
        cloud.DeployFailedError, cloud.NotAuthenticatedError, cloud.ModalUnreachableError,
        cloud.SecretMissingError, cloud.LimitReachedError, cloud.BuildFailedError,
        gateway_server.CannotListenError)}
    assert codes | {0} == set(cloud.EXIT_CODES)
    epilog = re.sub(r"\s+", " ", deploy.EXAMPLES)
    for code in cloud.EXIT_CODES:
        assert re.search(rf"\b{code} \w", epilog), (code, epilog)


def test_exit_codes_are_documented_in_the_readme():
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("no README.md in this checkout")
    text = readme.read_text()
    section = text[text.index("# Exit codes"):]
    section = section[: section.find("\n#", 1)]
    for code in cloud.EXIT_CODES:
        assert re.search(rf"^\| {code} \|", section, re.MULTILINE), (code, section)
