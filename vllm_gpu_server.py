# # One authenticated OpenAI-compatible endpoint per GPU type, every model behind it
#
#     GPU_KEY=h100 uv run modal deploy vllm_gpu_server.py
#
# builds the app `vllm-h100`: one CPU router function `serve` (the gateway:
# auth, route allowlist, routing by the request's `model`) and one GPU
# container pool per model that fits an H100. Each pool scales to zero on its
# own, and models never share GPU memory. The only web endpoint is the router:
# https://<workspace>--vllm-h100-serve.modal.run
#
# `deploy.py --gpu h100` does the same through the Modal SDK; `--all` builds
# the five apps in one process, which is why the app is built by a function.

from __future__ import annotations

import os

import modal

import config
import gpu_pool
import plan
import pool_state
import router_backend

MODULE = __name__


# ## The router: the gateway, with a backend that calls each model's pool
#
# Defined at module scope and decorated in `build`, so the container finds it
# by name after rebuilding the app from GPU_KEY (see gpu_pool.py).


def serve():
    from gateway import api_key_from_env, build_app

    built = _container_app()
    timeouts = plan.timeouts(gpu_pool.load_matrix().defaults)
    backend = router_backend.ModalBackend(
        built.pools,
        deadline=timeouts.router_wait,  # then 504, before Modal's own timeout cuts the router
        failures=pool_state.FailureWatch(built.plan.name),  # a pool that cannot start: 503
        cancel_marks=pool_state.CancelMarks(timeouts.router_wait),  # streams whose client left
    )
    return build_app(
        [pool.model for pool in built.plan.pools],
        backend,
        api_key=api_key_from_env(),  # from the `vllm-api-key` secret; refuses to start without
        unavailable={alias: f"does not fit on {f.gpu.modal_gpu}: {f.reason}"
                     for f in built.plan.skipped for alias in f.model.aliases},
        handoff_after=gpu_pool.HANDOFF_AFTER,  # a disconnect this late is Modal's 303, not the client
    )


# ## A smoke test: `modal run` brings the app up, checks health and one completion


def smoke_test(model: str = "", api_key: str = "", timeout: int = 20 * gpu_pool.MINUTES):
    """GPU_KEY=h100 uv run modal run vllm_gpu_server.py --model gemma-3-12b --api-key KEY"""
    gpu_pool.check_endpoint(_container_app(), model, api_key, timeout)


# ## Building the app


def build(matrix: config.Matrix, gpu_key: str) -> gpu_pool.Built:
    app_plan = plan.gpu_app(matrix, gpu_key)
    defaults = matrix.defaults
    app = modal.App(app_plan.name, include_source=False)  # the images add every module, once
    env = {"GPU_KEY": app_plan.gpu.key}  # the container rebuilds this same app on import
    gpu_image = gpu_pool.vllm_image(matrix, env, (MODULE,))

    pools = {}
    for pool in app_plan.pools:
        cls = gpu_pool.pool_class(pool, app_plan, MODULE)
        globals()[cls.__name__] = cls  # the name Modal looks up in the container
        concurrent = modal.concurrent(max_inputs=defaults.max_concurrent_inputs)  # per replica
        pools[pool.model.key] = app.cls(**gpu_pool.gpu_class_options(pool, defaults, gpu_image))(
            concurrent(cls)
        )

    router = app.function(
        image=gpu_pool.router_image(matrix, env, (MODULE,)),
        secrets=gpu_pool.secrets([plan.API_KEY_SECRET]),  # API_KEY for bearer auth
        cpu=config.ROUTER_CPU_CORES,  # the router relays bytes; one core is plenty
        memory=config.ROUTER_MEMORY_MIB,  # room for 32 MiB request bodies in flight
        scaledown_window=defaults.scaledown_window_seconds,  # stay up as long as the pools
        # Its clock runs while a pool queues for a GPU and starts, which the pools' own
        # timeouts do not count: it waits startup + request (plan.Timeouts), capped at 24 h.
        timeout=plan.timeouts(defaults).router,
        name=plan.WEB_FUNCTION,
    )(modal.concurrent(max_inputs=gpu_pool.ROUTER_CONCURRENCY)(modal.asgi_app()(serve)))

    entrypoint = app.local_entrypoint()(smoke_test)
    return gpu_pool.Built(app, app_plan, router, pools, [f"vllm=={defaults.vllm_version}"],
                          entrypoint)


_BUILT: dict[str, gpu_pool.Built] = {}


def _container_app() -> gpu_pool.Built:
    """The app this process built from GPU_KEY (inside the container, or under `modal`)."""
    if "app" not in _BUILT:
        matrix = gpu_pool.load_matrix()
        key = gpu_pool.container_key("GPU_KEY", list(matrix.gpus))
        _BUILT["app"] = build(matrix, key)
    return _BUILT["app"]


# `modal deploy` / `modal run` and the container read `app`; deploy.py calls
# `build` instead. Without GPU_KEY, `app` is a one-line error listing the keys.
def __getattr__(name: str):
    if name != "app":
        raise AttributeError(name)
    return gpu_pool.app_or_exit(_container_app)


if os.environ.get("GPU_KEY"):
    app = gpu_pool.app_or_exit(_container_app)  # at import: Modal then finds classes by name
