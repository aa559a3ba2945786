"""ComfyUI imported in-process, and the pack imported the way ComfyUI imports it, for the fast real-ComfyUI tests.

The pack is a package named after its folder (here `flux_lora_ops_unit`), so its relative imports resolve to its own
`lora_ops` and `nodes`, never to ComfyUI's top-level `nodes` module. The model is a tiny Flux-named module tree whose
Linears are ComfyUI's own `comfy.ops.manual_cast.Linear`. Skipped without COMFYUI_ROOT (see conftest.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from lora_factory import TINY, base_state_dict, write_lora

REPO_ROOT = Path(__file__).resolve().parents[2]


def import_pack(name: str, force_v1: bool = False):
    """Import the repository as ComfyUI does (a package named after the folder), optionally forcing V1."""
    if name in sys.modules:
        return sys.modules[name]
    old = os.environ.get("FLUX_LORA_OPS_FORCE_V1")
    os.environ["FLUX_LORA_OPS_FORCE_V1"] = "1" if force_v1 else ""
    try:
        spec = importlib.util.spec_from_file_location(
            name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        if old is None:
            os.environ.pop("FLUX_LORA_OPS_FORCE_V1", None)
        else:
            os.environ["FLUX_LORA_OPS_FORCE_V1"] = old


@pytest.fixture(scope="module")
def comfy(comfyui_root):
    root = str(comfyui_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.utils

    return comfy


@pytest.fixture(scope="module")
def pack(comfy):
    return import_pack("flux_lora_ops_unit")


@pytest.fixture(scope="module")
def rt(pack):
    return sys.modules[pack.__name__ + ".nodes.runtime"]


@pytest.fixture(scope="module")
def lc(pack):
    """The load / undo / switch module (what runs inside ComfyUI's patcher)."""
    return sys.modules[pack.__name__ + ".nodes.lifecycle"]


@pytest.fixture(scope="module")
def base():
    return base_state_dict(TINY, 0)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, pack, base):
    return make_loras(tmp_path_factory.mktemp("loras"), pack, TINY, base)


def make_loras(folder: Path, pack, shape, base: dict[str, torch.Tensor]) -> dict:
    """Three parsed LoRAs for a model of `shape`: a (kohya), b (diffusers), dora (DoRA), rank 4."""
    out = {}
    for name, fmt, seed in (("a", "kohya", 1), ("b", "diffusers", 2), ("dora", "dora", 3)):
        path = folder / f"{name}.safetensors"
        write_lora(fmt, path, shape, 4, seed, base=base)
        out[name] = pack.lora_ops.load_lora(path)
    return out


class _Root(torch.nn.Module):
    """Stands in for comfy.model_base.BaseModel: the Flux weights under `.diffusion_model`."""


def build_model(comfy, sd: dict[str, torch.Tensor]) -> _Root:
    """Flux-named module tree; Linear leaves are comfy.ops.manual_cast.Linear (lowvram-capable, like core)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        groups.setdefault(module, {})[param] = value
    dm = torch.nn.Module()
    for module, params in groups.items():
        parent = dm
        parts = module.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        if set(params) == {"weight", "bias"} and params["weight"].dim() == 2:
            out_f, in_f = params["weight"].shape
            leaf = comfy.ops.manual_cast.Linear(in_f, out_f, dtype=params["weight"].dtype)
        else:
            leaf = torch.nn.Module()
        for name, value in params.items():
            setattr(leaf, name, torch.nn.Parameter(value.clone(), requires_grad=False))
        parent.add_module(parts[-1], leaf)
    root = _Root()
    root.diffusion_model = dm
    return root


@pytest.fixture
def plain(comfy, base):
    """A fresh ModelPatcher (what UNETLoader returns) over a fresh tiny model; unloaded afterwards."""
    cpu = torch.device("cpu")
    with torch.inference_mode():  # as UNETLoader runs in ComfyUI: the weights are inference tensors
        model = build_model(comfy, base)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    yield patcher
    comfy.model_management.unload_all_models()
    comfy.model_management.current_loaded_models.clear()


def weights(patcher) -> dict[str, torch.Tensor]:
    return {k: p.data.clone() for k, p in patcher.model.diffusion_model.named_parameters()}


def fresh_merge(pack, base, stack) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in base.items()}
    pack.lora_ops.merge_loras(out, stack)
    return out


def assert_equal(actual: dict, expected: dict) -> None:
    bad = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def entry(rt, lora, strength, name="x"):
    return rt.StackEntry(name, strength, lora)


def load(comfy, patcher) -> None:
    comfy.model_management.load_models_gpu([patcher])


def core_lora(plain, keys, seed=7, strength=1.0):
    """A core-style weight patch (what LoraLoaderModelOnly adds) on a clone: a 'diff' per key."""
    gen = torch.Generator().manual_seed(seed)
    patches = {}
    deltas = {}
    for key in keys:
        shape = plain.model.diffusion_model.get_parameter(key).shape
        deltas[key] = torch.randn(shape, generator=gen) * 0.01
        patches["diffusion_model." + key] = ("diff", (deltas[key].to(torch.bfloat16),))
    clone = plain.clone()
    clone.add_patches(patches, strength)
    return clone, {k: d.to(torch.bfloat16).float() * strength for k, d in deltas.items()}


#: A CPU device that ComfyUI does not take for "cpu" by equality (a GPU would not be either).
CPU0 = torch.device("cpu", 0)


class _HostBuffer:
    """comfy_aimdo.host_buffer.HostBuffer without CUDA: nothing is pinned."""

    size = 0

    def __init__(self, *_args, **_kwargs) -> None:
        pass

    def truncate(self, *_args, **_kwargs) -> None:
        pass


def force_dynamic_on_cpu(comfy, setattr_=setattr) -> None:
    """Let ModelPatcherDynamic run on the CPU (load device CPU0): ComfyUI's `__new__` hands back the plain patcher
    for CPU devices and comfy_aimdo needs CUDA, so the class is forced, aimdo's host buffers are stubbed and there is
    no VRAM arena (what `_vbar_get` gives a CPU device). Everything else is ComfyUI's own code. `setattr_` lets a test
    pass monkeypatch.setattr."""
    import comfy_aimdo.host_buffer

    mpd = comfy.model_patcher.ModelPatcherDynamic
    setattr_(comfy_aimdo.host_buffer, "HostBuffer", _HostBuffer)
    setattr_(mpd, "__new__", lambda cls, *a, **k: object.__new__(cls))
    setattr_(mpd, "_vbar_get", lambda self, create=False: None)
