"""Fixtures that run a real ComfyUI server (CPU, bf16 diffusion model) for integration tests.

Set ``COMFYUI_ROOT`` to a ComfyUI checkout (0.3.64) and run pytest with a Python that has ComfyUI's
requirements installed; otherwise every test here is skipped.

Optional: ``FLUX_LORA_OPS_TEST_CACHE`` names a directory where the generated 1.1 GB test checkpoint
is kept between sessions (default: the session's pytest temp dir, regenerated each session).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from comfy_harness import (
    FLUX_TINY_SEED,
    ComfyServer,
    free_port,
    is_comfyui_root,
    make_base_directory,
    write_flux_tiny,
)
from inprocess import base, comfy, lc, loras, pack, plain, rt  # noqa: F401  (in-process fixtures)

#: In CI every real-ComfyUI test must run: a skip there is a failure.
REQUIRE_ENV = "FLUX_LORA_OPS_REQUIRE_COMFYUI"


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes")


def _tree_has(path: str, text: str) -> bool:
    root = os.environ.get("COMFYUI_ROOT")
    source = Path(root) / path if root else None
    return source is not None and source.is_file() and text in source.read_text()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of a ComfyUI feature (marker comfyui_has) are not applicable to a tree without it: deselected, not
    skipped (e.g. dynamic VRAM and quantized tensors on 0.3.x)."""
    if not os.environ.get("COMFYUI_ROOT"):
        return  # nothing runs: the fixtures skip with the reason

    def applicable(item: pytest.Item) -> bool:
        return all(_tree_has(*m.args) for m in item.iter_markers("comfyui_has"))

    dropped = [i for i in items if not applicable(i)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if applicable(i)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """With FLUX_LORA_OPS_REQUIRE_COMFYUI=1 (CI) a skipped real-ComfyUI test fails, with the skip's reason."""
    outcome = yield
    report = outcome.get_result()
    if _required() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ENV}=1 and this real-ComfyUI test was skipped: {reason}"


SERVER_START_TIMEOUT = float(os.environ.get("COMFYUI_START_TIMEOUT", "180"))


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    value = os.environ.get("COMFYUI_ROOT")
    if not value:
        pytest.skip(
            "COMFYUI_ROOT is not set: point it at a ComfyUI checkout (e.g. COMFYUI_ROOT=../shared/comfyui/0.33.0) "
            "to run the real-server integration tests"
        )
    if not is_comfyui_root(value):
        pytest.skip(f"COMFYUI_ROOT={value!r} is not a ComfyUI checkout (no main.py / nodes.py / comfy/ there)")
    return Path(value).resolve()


@pytest.fixture(scope="session")
def flux_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1 double + 1 single block, 3072-wide, bf16 Flux checkpoint (bare BFL key names), seed 0."""
    cache = os.environ.get("FLUX_LORA_OPS_TEST_CACHE")
    folder = Path(cache) if cache else tmp_path_factory.getbasetemp() / "flux_cache"
    return write_flux_tiny(folder / f"flux_tiny_d1s1_seed{FLUX_TINY_SEED}.safetensors")


@pytest.fixture(scope="session")
def comfy_server(comfyui_root: Path, flux_tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI server on 127.0.0.1 with the pack and the test node pack installed.

    ``base_dir`` holds ``models/diffusion_models/flux_tiny.safetensors``, ``models/loras/`` (empty; use
    ``server.add_lora(path)`` or ``server.loras_dir``), ``custom_nodes/{flux_lora_ops,
    flux_lora_ops_test_nodes}`` and ``output/``. The log is at ``server.log_path``.
    """
    base_dir = tmp_path_factory.mktemp("comfy_base")
    make_base_directory(base_dir, flux_tiny_checkpoint)
    server = ComfyServer(
        comfyui_root=comfyui_root,
        base_dir=base_dir,
        log_path=tmp_path_factory.getbasetemp() / "comfyui_server.log",
        port=free_port(),
    )
    server.start(timeout=SERVER_START_TIMEOUT)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def delete_server_outputs(request: pytest.FixtureRequest):
    """What the server saved during a test (ModelSave writes a ~1 GB model each time) is deleted after it: over
    the suite these files add up to about 20 GB on a disk that other jobs share."""
    yield
    if "comfy_server" not in request.fixturenames:
        return
    output = request.getfixturevalue("comfy_server").output_dir
    # Files only: ComfyUI keeps the folders it lists models from (output/diffusion_models among them) in a cache.
    for item in output.rglob("*"):
        if not item.is_dir():
            item.unlink()
