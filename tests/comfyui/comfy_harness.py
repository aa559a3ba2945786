"""Helpers for integration tests that drive a real ComfyUI server over HTTP (loopback only).

The pytest fixtures live in ``conftest.py``; this module holds the parts that are plain code so that
tests (and scripts) can import them: the tiny Flux checkpoint generator and the ``ComfyServer`` client.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_NODES_PACK = Path(__file__).resolve().parent / "test_nodes_pack"

#: Name of the pack's folder inside ``custom_nodes/`` (a symlink to the repository root).
PACK_DIR_NAME = "flux_lora_ops"
#: Name of the test-only node pack's folder inside ``custom_nodes/``.
TEST_PACK_DIR_NAME = "flux_lora_ops_test_nodes"
#: File name of the generated checkpoint inside ``models/diffusion_models/``.
FLUX_TINY_NAME = "flux_tiny.safetensors"
FLUX_TINY_SEED = 0

HOST = "127.0.0.1"


class ComfyError(RuntimeError):
    """A prompt failed, was rejected, timed out, or the server died."""


def is_comfyui_root(path: str | os.PathLike[str] | None) -> bool:
    if not path:
        return False
    root = Path(path)
    return (root / "main.py").is_file() and (root / "nodes.py").is_file() and (root / "comfy").is_dir()


def reads_comfy_quant(root: str | os.PathLike[str]) -> bool:
    """Whether this ComfyUI has quantized tensors and loads comfy_quant fp8 files natively (0.33.0: yes; 0.3.64: no,
    it reads scaled_fp8 files)."""
    return (Path(root) / "comfy" / "quant_ops.py").is_file()


# --------------------------------------------------------------------------------------------- checkpoint


def flux_tiny_state_dict(seed: int = FLUX_TINY_SEED, depth: int = 1, depth_single: int = 1) -> dict[str, Any]:
    """A Flux-dev-shaped state dict (BFL names, no prefix) that ComfyUI detects as Flux.

    ComfyUI hard-codes hidden 3072 / context 4096 / 24 heads for Flux, so only the block counts can
    shrink. Weights and biases are ``randn * 0.02`` (drawn in fp32 from one seeded generator, in file
    order, then cast to bf16); qk-norm scales are 1.0.
    """
    import torch

    from lora_ops.flux import FluxShape, flux_weight_shapes

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for name, dims in flux_weight_shapes(FluxShape(depth=depth, depth_single=depth_single)).items():
        if name.endswith("_norm.scale"):
            out[name] = torch.ones(dims, dtype=torch.bfloat16)
        else:
            out[name] = (torch.randn(dims, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    return out


def write_flux_tiny(path: Path, seed: int = FLUX_TINY_SEED, depth: int = 1, depth_single: int = 1) -> Path:
    """Write the tiny Flux checkpoint to ``path`` (atomically) unless it already exists."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sd = flux_tiny_state_dict(seed, depth, depth_single)
    save_file(sd, str(tmp), metadata={"flux_lora_ops_test": f"seed={seed} depth={depth} depth_single={depth_single}"})
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- server


def ksampler_node(model: list, cond: list, latent: list, seed: int, steps: int = 1) -> dict[str, Any]:
    """An API-format KSampler node: euler/simple, cfg 1, full denoise, one conditioning for both sides."""
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": cond,
            "negative": cond,
            "latent_image": latent,
            "denoise": 1.0,
        },
    }


#: Prefix ModelSave gives the diffusion model's keys.
SAVE_PREFIX = "model.diffusion_model."


def read_saved_model(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A ModelSave file as {bare Flux key: tensor}, and its metadata.

    ComfyUI 0.33 loads Flux `*_norm.scale` as `*_norm.weight` and ModelSave writes that name; it is mapped back
    here so that files of every version compare with our (BFL-named) weights.
    """
    from safetensors import safe_open

    out: dict[str, Any] = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            bare = key.removeprefix(SAVE_PREFIX)
            if bare.endswith("_norm.weight"):
                bare = bare.removesuffix(".weight") + ".scale"
            out[bare] = f.get_tensor(key)
    return out, metadata


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def make_base_directory(base: Path, checkpoint: Path) -> Path:
    """Lay out a ComfyUI ``--base-directory``: models, custom_nodes, input, output, temp, user."""
    base.mkdir(parents=True, exist_ok=True)
    for sub in ("models/diffusion_models", "models/loras", "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    target = base / "models" / "diffusion_models" / FLUX_TINY_NAME
    if not target.exists():
        _link_or_copy(Path(checkpoint).resolve(), target)
    # The pack itself: ComfyUI imports custom_nodes/<name>/__init__.py. If the repository has no
    # __init__.py yet, ComfyUI logs "IMPORT FAILED" for it and carries on.
    pack = base / "custom_nodes" / PACK_DIR_NAME
    if not pack.exists():
        _link_or_copy(REPO_ROOT, pack)
    test_pack = base / "custom_nodes" / TEST_PACK_DIR_NAME
    if not test_pack.exists():
        _link_or_copy(TEST_NODES_PACK, test_pack)
    return base


@dataclass
class ComfyServer:
    """A ComfyUI process serving on 127.0.0.1, plus a small HTTP client for it."""

    comfyui_root: Path
    base_dir: Path
    log_path: Path
    port: int
    extra_args: tuple[str, ...] = ()
    device_args: tuple[str, ...] = ("--cpu",)  # e.g. ("--enable-dynamic-vram",) on a GPU
    proc: subprocess.Popen | None = None
    session: requests.Session = field(default_factory=requests.Session)
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    # ---- layout
    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def loras_dir(self) -> Path:
        return self.base_dir / "models" / "loras"

    @property
    def diffusion_models_dir(self) -> Path:
        return self.base_dir / "models" / "diffusion_models"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def checkpoint_path(self) -> Path:
        return self.diffusion_models_dir / FLUX_TINY_NAME

    def command(self) -> list[str]:
        return [
            sys.executable,
            "main.py",
            *self.device_args,
            "--bf16-unet",
            "--listen",
            HOST,
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
            # Keep ComfyUI's sqlite DB inside the temporary base directory (default: <root>/user/).
            "--database-url",
            f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}",
            # The API (cloud) nodes are not needed and slow down start-up.
            "--disable-api-nodes",
            *self.extra_args,
        ]

    # ---- process
    def start(self, timeout: float = 180.0) -> ComfyServer:
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",  # no __pycache__ in the repository or the ComfyUI checkout
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            DO_NOT_TRACK="1",
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log_file = log
        self.proc = subprocess.Popen(
            self.command(),
            cwd=str(self.comfyui_root),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start-up.\n{self.log_tail()}")
            try:
                r = self.session.get(f"{self.url}/object_info/KSampler", timeout=5)
                if r.status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyError(f"ComfyUI did not answer /object_info within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        log = getattr(self, "_log_file", None)
        if log is not None:
            log.close()
            self._log_file = None
        self.session.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- ComfyUI log tail ({self.log_path}) ---\n{tail}"

    # ---- HTTP
    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 60)
        return self.session.get(f"{self.url}{path}", **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 60)
        return self.session.post(f"{self.url}{path}", json=json, **kw)

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """``GET /object_info`` (all nodes) or ``/object_info/<node_class>`` (``{}`` if unknown)."""
        r = self.get("/object_info" if node_class is None else f"/object_info/{node_class}")
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict[str, Any], prompt_id: str | None = None) -> str:
        """POST an API-format prompt; returns its prompt_id. Raises ComfyError if validation fails."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        r = self.post("/prompt", json=body)
        if r.status_code != 200:
            raise ComfyError(f"POST /prompt rejected ({r.status_code}): {r.text}")
        return r.json()["prompt_id"]

    def validate(self, prompt: dict[str, Any]) -> requests.Response:
        """POST a prompt and return the raw response (for tests that expect rejection)."""
        return self.post("/prompt", json={"prompt": prompt, "client_id": self.client_id})

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        r = self.get(f"/history/{prompt_id}")
        r.raise_for_status()
        return r.json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, *, check: bool = True) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished; returns its history entry.

        The entry has ``prompt``, ``outputs`` (node id -> ui dict) and ``status``
        (``status_str`` 'success'/'error', ``completed``, ``messages`` [(event, data), ...]).
        With ``check`` (default) an error status raises ComfyError with the messages and log tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                entry = self.history(prompt_id)
            except requests.RequestException as e:
                if self.alive():
                    raise ComfyError(f"GET /history/{prompt_id} failed: {e!r}\n{self.log_tail()}") from e
                entry = None
            if entry is not None and entry.get("status") is not None:
                if check and entry["status"].get("status_str") != "success":
                    raise ComfyError(f"prompt {prompt_id} failed: {self.error_summary(entry)}\n{self.log_tail()}")
                return entry
            if not self.alive():
                raise ComfyError(f"ComfyUI died while running prompt {prompt_id}.\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")
            time.sleep(0.25)

    def run(self, prompt: dict[str, Any], timeout: float = 600.0, *, check: bool = True) -> dict[str, Any]:
        return self.wait(self.queue(prompt), timeout, check=check)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post("/interrupt", json={"prompt_id": prompt_id} if prompt_id else {}).raise_for_status()

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", json={"unload_models": unload_models, "free_memory": free_memory}).raise_for_status()

    @staticmethod
    def error_summary(entry: dict[str, Any]) -> str:
        status = entry.get("status") or {}
        parts = [str(status.get("status_str"))]
        for event, data in status.get("messages", []):
            if event in ("execution_error", "execution_interrupted"):
                parts.append(
                    f"{event}: node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type', '')} {data.get('exception_message', '')}".rstrip()
                )
                tb = data.get("traceback")
                if tb:
                    parts.append("".join(tb))
        return "\n".join(parts)

    def output_files(self, entry: dict[str, Any], node_id: str, kind: str) -> list[Path]:
        """Paths of the files a node reported in its ui output (e.g. kind="latents" or "images")."""
        files = entry["outputs"].get(node_id, {}).get(kind, [])
        roots = {"output": self.output_dir, "temp": self.base_dir / "temp", "input": self.input_dir}
        return [roots[f.get("type", "output")] / f.get("subfolder", "") / f["filename"] for f in files]

    def listen(self) -> WsEvents:
        """Open the websocket as this client; use as a context manager *before* queueing prompts.

        Progress ("progress", "progress_state"), "executing", "executed", "execution_*" events of
        prompts queued by this ComfyServer (same client_id) are collected in ``events``.
        """
        return WsEvents(f"ws://{HOST}:{self.port}/ws?clientId={self.client_id}")

    def add_lora(self, src: str | os.PathLike[str], name: str | None = None) -> str:
        """Copy a LoRA file into ``models/loras``; returns the name to use in ``lora_name`` inputs."""
        src = Path(src)
        name = name or src.name
        dst = self.loras_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        return name


class WsEvents:
    """Collects the JSON messages of ComfyUI's ``/ws`` socket on a background thread (aiohttp)."""

    def __init__(self, url: str):
        self.url = url
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise ComfyError(f"could not open {self.url}: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
                self._ready.set()
                stop = asyncio.ensure_future(self._stop.wait())
                while not self._stop.is_set():
                    recv = asyncio.ensure_future(ws.receive())
                    done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if recv not in done:
                        recv.cancel()
                        break
                    msg = recv.result()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        with self._cond:
                            self.events.append(json.loads(msg.data))
                            self._cond.notify_all()
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                        break
                stop.cancel()
        except BaseException as e:  # noqa: BLE001 - reported to the waiting test thread
            self._error = e
            self._ready.set()

    def of(self, event_type: str, prompt_id: str | None = None) -> list[dict[str, Any]]:
        """The ``data`` of every collected event of this type (optionally of one prompt)."""
        with self._cond:
            return [
                e["data"]
                for e in self.events
                if e.get("type") == event_type and (prompt_id is None or e["data"].get("prompt_id") == prompt_id)
            ]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 120.0) -> dict[str, Any]:
        """Block until an event (``{"type", "data"}``) satisfying ``predicate`` arrived; returns it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for e in self.events[seen:]:
                    if predicate(e):
                        return e
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ComfyError(f"no matching websocket event within {timeout:.0f} s; got {self.events[-10:]}")
                self._cond.wait(min(left, 0.5))
