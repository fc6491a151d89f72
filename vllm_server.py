# # Legacy: one app per model x GPU, one GPU container with the gateway inside
#
#     MODEL_KEY=gemma-3-12b-l40s uv run modal deploy vllm_server.py
#
# builds the app `vllm-gemma-3-12b-l40s`. Its one web function `serve` starts
# vLLM on localhost when the container starts and answers through the same
# gateway as the GPU apps (bearer auth, route allowlist), with an HTTP backend
# to that local engine, so a legacy endpoint is no less secure:
# https://<workspace>--vllm-gemma-3-12b-l40s-serve.modal.run
#
# Fifteen of these exceed a Starter workspace's 8 web endpoints; prefer
# vllm_gpu_server.py. `deploy.py --model gemma-3-12b-l40s` builds it with `build`.

from __future__ import annotations

import atexit
import os

import modal

import config
import engine
import gpu_pool
import plan
import pool_state

MODULE = __name__


# ## The web function: boot the engine, then serve the gateway in front of it
#
# Modal calls this once per container, before the first request, under the
# startup timeout: the engine's cold start happens here.


def serve():
    from gateway import api_key_from_env, build_app

    built = _container_app()
    pool = built.plan.pools[0]
    matrix = gpu_pool.load_matrix()
    records = pool_state.Records()  # what --status shows: the GPU got, or why vLLM failed
    vllm = engine.Engine(pool.argv, env=engine.engine_env())
    try:
        vllm.start()
        atexit.register(vllm.stop)  # the container's shutdown also ends vLLM and its workers
        vllm.wait_ready(max(60, matrix.defaults.startup_timeout_seconds - gpu_pool.MINUTES))
    except Exception as exc:
        records.report_failure(built.plan.name, pool.model.key, exc)
        raise
    facts = pool_state.gpu_facts()
    records.report_ready(built.plan.name, pool.model.key, facts)
    return build_app(
        [pool.model],
        # A dead vLLM retires this container; answers carry the engine's time and the GPU.
        gpu_pool.LocalEngine(vllm, pool.model.key, gpu_header=pool_state.facts_header(facts)),
        api_key=api_key_from_env(),  # from the `vllm-api-key` secret; refuses to start without
        handoff_after=gpu_pool.HANDOFF_AFTER,  # a disconnect this late is Modal's 303
    )


def smoke_test(api_key: str = "", timeout: int = 20 * gpu_pool.MINUTES):
    """MODEL_KEY=gemma-3-12b-l40s uv run modal run vllm_server.py --api-key KEY"""
    gpu_pool.check_endpoint(_container_app(), "", api_key, timeout)


# ## Building the app


def build(matrix: config.Matrix, key: str) -> gpu_pool.Built:
    app_plan = plan.legacy_app(matrix, key)
    defaults = matrix.defaults
    pool = app_plan.pools[0]
    app = modal.App(app_plan.name, include_source=False)  # the image adds every module, once
    env = {"MODEL_KEY": key.strip().lower()}  # the container rebuilds this same app on import
    options = gpu_pool.gpu_class_options(pool, defaults, gpu_pool.vllm_image(matrix, env, (MODULE,)))
    options["secrets"] = gpu_pool.secrets(app_plan.secrets)  # API_KEY, and HF_TOKEN if gated
    web = app.function(**options, name=plan.WEB_FUNCTION)(
        modal.concurrent(max_inputs=defaults.max_concurrent_inputs)(modal.asgi_app()(serve))
    )
    entrypoint = app.local_entrypoint()(smoke_test)
    return gpu_pool.Built(app, app_plan, web, {}, [f"vllm=={defaults.vllm_version}"], entrypoint)


_BUILT: dict[str, gpu_pool.Built] = {}


def _container_app() -> gpu_pool.Built:
    if "app" not in _BUILT:
        matrix = gpu_pool.load_matrix()
        valid = [config.legacy_key(f.model.key, f.gpu.key) for f in matrix.legacy_cells()]
        _BUILT["app"] = build(matrix, gpu_pool.container_key("MODEL_KEY", valid))
    return _BUILT["app"]


def __getattr__(name: str):
    if name != "app":
        raise AttributeError(name)
    return gpu_pool.app_or_exit(_container_app)


if os.environ.get("MODEL_KEY"):
    app = gpu_pool.app_or_exit(_container_app)
