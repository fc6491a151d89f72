"""Modal's whole bill: what each container reserves, as built into the Modal apps, and what
that costs. Modal bills CPU and memory on GPU containers at the greater of reservation and
use (modal.com/docs/guide/resources); the reservations are read back from the built apps'
`Function.info()` (no Modal account needed), the prices worked out by hand."""

import pytest

import config
import plan
import vllm_gpu_server
import vllm_server

MATRIX = config.load()
GIB_MIB = 1024


def info(cls):
    return cls._get_class_service_function().info()


@pytest.mark.parametrize("gpu", ["l40s", "h100"])
def test_every_gpu_pool_reserves_cpu_and_memory_for_vllm(gpu):
    built = vllm_gpu_server.build(MATRIX, gpu)
    for model, cls in built.pools.items():
        count = 2 if gpu == "l40s" and model != "gemma-3-12b" else 1
        pool = info(cls)
        # 2 cores (API server, engine core) + 1 per GPU worker + 1 for images (all three
        # models take images); 8 GiB + 6 GiB per GPU.
        assert (pool.cpu, pool.memory_mib) == (3.0 + count, (8 + 6 * count) * GIB_MIB), model
    router = built.web.info()
    assert (router.cpu, router.memory_mib) == (1.0, 1024)  # the router relays bytes


def test_a_legacy_app_reserves_what_its_pool_would():
    web = vllm_server.build(MATRIX, "qwen3-vl-30b-l40s").web.info()
    assert (web.cpu, web.memory_mib) == (5.0, 20 * GIB_MIB)  # 2 + 2 GPUs + 1; 8 + 2 x 6 GiB


def test_a_snapshot_pool_also_reserves_its_whole_weights(tmp_path):
    # POST /sleep?level=1 moves the weights to host memory before Modal snapshots the
    # container (vllm/device_allocator/sleep_mode_backend.py): 24.38e9 bytes of gemma-3-12b
    # weights = ceil(24.38e9 / 2**20) = 23,251 MiB on top of 8 + 6 GiB.
    text = config.DEFAULT_PATH.read_text().replace(
        "    name: google/gemma-3-12b-it", "    name: google/gemma-3-12b-it\n    snapshot: true")
    (tmp_path / "m.yaml").write_text(text)
    matrix = config.load(tmp_path / "m.yaml")
    assert -(-24_380_000_000 // 2**20) == 23_251
    pool = info(vllm_gpu_server.build(matrix, "h100").pools["gemma-3-12b"])
    assert (pool.cpu, pool.memory_mib) == (4.0, 14 * GIB_MIB + 23_251)
    # 37,587 MiB x $0.007992 / 1024 = $0.29336 per hour of memory, beside $0.18864 of CPU.
    app = plan.gpu_app(matrix, "h100")
    bill = next(p for p in app.pools if p.model.key == "gemma-3-12b").bill
    assert bill.memory_usd_per_hour == pytest.approx(37_587 / 1024 * 0.007992)
    assert bill.usd_per_hour == pytest.approx(3.95 + 0.18864 + 37_587 / 1024 * 0.007992)
    # The legacy app of the same cell does not snapshot, so it does not reserve the weights.
    legacy = plan.legacy_app(matrix, "gemma-3-12b-h100").pools[0]
    assert (legacy.snapshot, legacy.bill.memory_mib) == (False, 14 * GIB_MIB)


def test_other_rates_in_models_yaml_change_every_price(tmp_path):
    text = config.DEFAULT_PATH.read_text().replace(
        "cpu_core_usd_per_hour: 0.04716", "cpu_core_usd_per_hour: 0.1").replace(
        "memory_gib_usd_per_hour: 0.007992", "memory_gib_usd_per_hour: 0.01")
    (tmp_path / "m.yaml").write_text(text)
    matrix = config.load(tmp_path / "m.yaml")
    fit = matrix.fit(matrix.models["gemma-3-27b"], matrix.gpus["l40s"])
    # 2 x $1.95 + 5 cores x $0.1 + 20 GiB x $0.01 = $4.60.
    assert fit.usd_per_hour_split == pytest.approx({"gpu": 3.9, "cpu": 0.5, "memory": 0.2})
    assert fit.usd_per_hour == pytest.approx(4.6)
    assert matrix.router_bill.usd_per_hour == pytest.approx(0.1 + 0.01)


@pytest.mark.parametrize(("line", "message"), [
    ("cpu_core_usd_per_hour: 0.04716", "cpu_core_usd_per_hour: -1"),
    ("read_on: \"2026-06-27\"", "read_on: \"2026-06-27\"\n  currency: EUR"),
])
def test_a_wrong_billing_section_is_one_line(tmp_path, line, message):
    (tmp_path / "m.yaml").write_text(config.DEFAULT_PATH.read_text().replace(line, message))
    with pytest.raises(config.ConfigError) as err:
        config.load(tmp_path / "m.yaml")
    assert len(str(err.value).splitlines()) == 1 and str(err.value).split(": ")[1].startswith(
        "billing."), str(err.value)
