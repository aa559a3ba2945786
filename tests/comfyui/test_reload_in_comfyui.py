"""When an exact undo is impossible inside ComfyUI, the merged weights come back from the model file (issue #11).

A model is loaded by UNETLoader's own loader (`comfy.sd.load_diffusion_model`) from a file in a temporary models
folder, a stack is merged through the pack's lifecycle, and one merged element is changed behind the pack's back, so
that taking the stack out would not give back the original bits (UndoError). ComfyUI's unpatch (or a strength switch,
or the rollback of a failed load) then reloads every merged weight from the file: the weights equal the file's bits
cast as the loader cast them, the record is gone and a warning names the file. With no matching file the UndoError
surfaces as before and the record stays.

Oracle: the file's tensors as safetensors' own reader gives them, cast with torch's `.to` to the loaded dtype.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import pytest
import torch
from inprocess import core_lora, entry, load
from lora_factory import write_lora
from safetensors import safe_open

from lora_ops.flux import FluxShape
from lora_ops.synthetic import write_flux_checkpoint

#: Small Linears of the 3072-wide test checkpoint: the merge and the reload stay quick on the CPU.
TARGETS = ("img_in", "final_layer.linear", "time_in.in_layer", "vector_in.in_layer")
SHAPE = FluxShape(depth=1, depth_single=1)
NAME = "flux_tiny.safetensors"


@pytest.fixture(scope="module")
def lora(tmp_path_factory, pack):
    path = tmp_path_factory.mktemp("reload_lora") / "lora.safetensors"
    write_lora("kohya", path, SHAPE, 4, 11, targets=TARGETS)
    return pack.lora_ops.load_lora(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, flux_tiny_checkpoint):
    """A ComfyUI models folder: diffusion_models/ holds the test checkpoint, checkpoints/ a small Flux file that
    is not it (a candidate the search must pass over)."""
    root = tmp_path_factory.mktemp("models")
    for sub in ("diffusion_models", "checkpoints", "empty"):
        (root / sub).mkdir()
    os.symlink(flux_tiny_checkpoint, root / "diffusion_models" / NAME)
    write_flux_checkpoint(root / "checkpoints" / "other_flux.safetensors", FluxShape(hidden=64, heads=1, depth=1,
                          depth_single=1, context_dim=32, vec_dim=16), seed=1, prefix="model.diffusion_model.")
    return root


def point_folders(monkeypatch, models, sub_for_diffusion: str = "diffusion_models") -> None:
    """ComfyUI's diffusion_models and checkpoints folders are ours (no file lists cached from before)."""
    import folder_paths

    exts = folder_paths.folder_names_and_paths["diffusion_models"][1]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(models / sub_for_diffusion)],
                                                                                 exts))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(models / "checkpoints")], exts))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})


@pytest.fixture
def unet(comfy, models):
    """What UNETLoader returns for models/diffusion_models/flux_tiny.safetensors (weight_dtype default)."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model(str(models / "diffusion_models" / NAME))
    yield patcher
    comfy.model_management.unload_all_models()
    comfy.model_management.current_loaded_models.clear()


def file_bits(path, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors for the live weights, cast to their dtypes (ComfyUI names norm scales `.weight`)."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for key, tensor in live.items():
            name = key if key in names else re.sub(r"_norm\.weight$", "_norm.scale", key)
            out[key] = f.get_tensor(name).to(tensor.dtype)
    return out


def live(patcher) -> dict[str, torch.Tensor]:
    return {k: p.data for k, p in patcher.model.diffusion_model.named_parameters()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(ints), b.reshape(-1).view(ints))


def break_undo(lc, patcher) -> tuple[str, int, float]:
    """Add 0.01 to one merged element the undo journal does not hold, in place (a stray op behind the pack's back):
    the undo's fingerprint check then fails. Returns where, and the value it had."""
    state = lc.record_of(patcher.model).state
    key = sorted(state.fingerprints)[0]
    weight = live(patcher)[key]
    journal = state.journals[key]
    held = set(journal.lookup(0, weight.numel())[0].tolist()) if journal.entries else set()
    at = next(i for i in range(weight.numel()) if i not in held)
    value = weight.reshape(-1)[at].item()
    with torch.inference_mode():
        weight.reshape(-1)[at] += 0.01
    return key, at, value


def merged_by(comfy, rt, lc, unet, lora, strength=0.9):
    merged = rt.attach_plan(unet, [entry(rt, lora, strength)])
    load(comfy, merged)
    keys = sorted(lc.record_of(unet.model).state.fingerprints)
    assert keys == sorted(t + ".weight" for t in TARGETS)
    return merged, keys


def assert_reloaded(pack, lc, unet, models, caplog, keys) -> None:
    path = str(models / "diffusion_models" / NAME)
    weights = live(unet)
    wanted = file_bits(path, weights)
    bad = [k for k in weights if not same_bits(weights[k], wanted[k])]
    assert not bad, f"{len(bad)} weights differ from the file's bits, e.g. {bad[:3]}"
    assert lc.record_of(unet.model) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and path in r.getMessage()]
    assert len(warnings) == 1 and f"reloaded the {len(keys)} merged weights from {path}" in warnings[0]
    assert "fingerprint" in warnings[0]
    assert unet.model.__dict__[sys.modules[pack.__name__ + ".nodes.model_file"].SOURCE_ATTR] == path


@pytest.mark.comfyui_has("comfy/sd.py", "model.cached_patcher_init = (load_diffusion_model, (unet_path")
def test_an_impossible_undo_reloads_from_the_file_the_loader_read(comfy, pack, rt, lc, unet, lora, models,
                                                                   monkeypatch, caplog):
    point_folders(monkeypatch, models, "empty")  # the search cannot find it: the loader's own path must be used
    merged, keys = merged_by(comfy, rt, lc, unet, lora)
    assert lc.record_of(unet.model).source == str(models / "diffusion_models" / NAME)
    after_merge = {k: v.clone() for k, v in live(merged).items() if k in keys}
    break_undo(lc, unet)
    with caplog.at_level(logging.INFO, logger="flux_lora_ops"):
        load(comfy, unet)  # another clone loads: ComfyUI unpatches, our undo runs and cannot be exact
    assert_reloaded(pack, lc, unet, models, caplog, keys)
    load(comfy, merged)  # and the stack merges again into the reloaded base: the same bits as the first time
    assert all(same_bits(live(merged)[k], after_merge[k]) for k in keys)


def test_an_impossible_undo_finds_the_model_file_in_comfyuis_folders(comfy, pack, rt, lc, unet, lora, models,
                                                                     monkeypatch, caplog):
    point_folders(monkeypatch, models)
    if getattr(unet, "cached_patcher_init", None) is not None:
        unet.cached_patcher_init = None  # as a custom loader leaves it (and as 0.3.x has it)
    merged, keys = merged_by(comfy, rt, lc, unet, lora)
    assert lc.record_of(unet.model).source is None
    break_undo(lc, unet)
    with caplog.at_level(logging.INFO, logger="flux_lora_ops"):
        load(comfy, unet)
    assert_reloaded(pack, lc, unet, models, caplog, keys)


def test_a_strength_switch_that_cannot_take_the_old_stack_out_reloads_then_merges(comfy, pack, rt, lc, unet, lora,
                                                                                  models, monkeypatch, caplog):
    point_folders(monkeypatch, models)
    first, keys = merged_by(comfy, rt, lc, unet, lora, 0.9)
    reference = rt.attach_plan(unet, [entry(rt, lora, -0.4)])
    load(comfy, reference)  # the one-pass switch, exact: what -0.4 must give
    wanted = {k: v.clone() for k, v in live(reference).items() if k in keys}
    load(comfy, first)
    break_undo(lc, unet)
    switched = rt.attach_plan(unet, [entry(rt, lora, -0.4)])
    with caplog.at_level(logging.INFO, logger="flux_lora_ops"):
        load(comfy, switched)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "reloaded the 4 merged" in r.getMessage()]
    assert lc.record_of(unet.model).owner == switched.patches_uuid
    assert all(same_bits(live(switched)[k], wanted[k]) for k in keys)
    load(comfy, unet)
    weights = live(unet)
    assert all(same_bits(weights[k], v) for k, v in file_bits(models / "diffusion_models" / NAME, weights).items())


def test_with_no_matching_file_the_error_surfaces_and_the_record_stays(comfy, pack, rt, lc, unet, lora, models,
                                                                       monkeypatch, caplog):
    point_folders(monkeypatch, models, "empty")
    if getattr(unet, "cached_patcher_init", None) is not None:
        unet.cached_patcher_init = None
    _, keys = merged_by(comfy, rt, lc, unet, lora)
    key, at, value = break_undo(lc, unet)
    tampered = {k: v.clone() for k, v in live(unet).items() if k in keys}
    with caplog.at_level(logging.INFO, logger="flux_lora_ops"), pytest.raises(pack.lora_ops.UndoError) as caught:
        lc.undo(unet.model)
    assert key in str(caught.value) and "reload the model" in str(caught.value)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "could not be reloaded from the model file" in errors[0] and key in errors[0]
    assert lc.record_of(unet.model) is not None
    assert all(same_bits(live(unet)[k], tampered[k]) for k in keys)  # nothing was changed
    with torch.inference_mode():
        live(unet)[key].reshape(-1)[at] = value  # the stray change taken back: the undo is exact again
    load(comfy, unet)
    weights = live(unet)
    assert all(same_bits(weights[k], v) for k, v in file_bits(models / "diffusion_models" / NAME, weights).items())


def test_a_failed_load_whose_pre_merge_cannot_be_undone_reloads_it(comfy, pack, rt, lc, unet, lora, models,
                                                                   monkeypatch, caplog):
    """With a core LoRA on one of our weights, that weight is merged before ComfyUI's load (pre-merge). The merge
    after the load fails, and the pre-merged weight was changed behind the pack's back, so the rollback cannot
    undo it exactly: it is reloaded from the file, and ComfyUI's own restore then leaves every weight as the file."""
    point_folders(monkeypatch, models)
    key = "img_in.weight"
    core, _ = core_lora(unet, [key])
    both = rt.attach_plan(core, [entry(rt, lora, 0.9)])
    calls, real_merge = [], lc._merge

    def merge(target, pairs, **kw):
        calls.append(target)
        if len(calls) == 1:
            out = real_merge(target, pairs, **kw)
            calls.append(out)
            return out
        pre_target, pre_state = calls[0], calls[1]
        journal = pre_state.journals[key]
        held = set(journal.lookup(0, pre_target[key].numel())[0].tolist()) if journal.entries else set()
        at = next(i for i in range(pre_target[key].numel()) if i not in held)
        with torch.inference_mode():
            pre_target[key].reshape(-1)[at] += 0.01
        raise RuntimeError("injected failure of the merge after ComfyUI's load")

    monkeypatch.setattr(lc, "_merge", merge)
    with caplog.at_level(logging.INFO, logger="flux_lora_ops"), pytest.raises(RuntimeError, match="injected"):
        load(comfy, both)
    assert sorted(calls[1].fingerprints) == [key]  # the pre-merge held exactly the core-patched weight
    path = str(models / "diffusion_models" / NAME)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and f"reloaded the 1 merged weights from {path}"
            in r.getMessage()]
    monkeypatch.setattr(lc, "_merge", real_merge)
    load(comfy, unet)
    weights = live(unet)
    bad = [k for k, v in file_bits(path, weights).items() if not same_bits(weights[k], v)]
    assert not bad and lc.record_of(unet.model) is None


def test_a_failed_load_whose_merge_cannot_be_rolled_back_reloads_those_weights(comfy, pack, rt, lc, unet, lora,
                                                                               models, monkeypatch, caplog):
    """The merge after ComfyUI's load fails in its third weight and its rollback cannot run at all: the weights it
    had changed are reloaded from the model file, each checked against the fingerprint of its original bits (those
    the merge saw as it wrote), and the load fails with the merge's own error."""
    point_folders(monkeypatch, models)
    job = sys.modules[pack.__name__ + ".lora_ops.transition"].KeyJob
    real_run_tile, started = job.run_tile, []

    def run_tile(self, r0, r1):
        if self.key not in started:
            started.append(self.key)
        if len(started) == 3:
            raise RuntimeError("injected failure in the merge after ComfyUI's load")
        real_run_tile(self, r0, r1)

    def rollback(self):
        raise RuntimeError("injected: the rollback cannot run")

    monkeypatch.setattr(job, "run_tile", run_tile)
    monkeypatch.setattr(job, "rollback", rollback)
    merged = rt.attach_plan(unet, [entry(rt, lora, 0.9)])
    with caplog.at_level(logging.INFO, logger="flux_lora_ops"), pytest.raises(RuntimeError, match="after ComfyUI"):
        load(comfy, merged)
    path = str(models / "diffusion_models" / NAME)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and f"reloaded the 3 merged weights from {path}"
            in r.getMessage()]
    weights = live(unet)
    bad = [k for k, v in file_bits(path, weights).items() if not same_bits(weights[k], v)]
    assert not bad and lc.record_of(unet.model) is None
    monkeypatch.undo()
    load(comfy, merged)  # the stack merges into the reloaded base
    assert sorted(lc.record_of(unet.model).state.fingerprints) == sorted(t + ".weight" for t in TARGETS)
