"""Reloading merged weights from the model file when an exact undo is impossible (issue #11): the file's bits come
back exactly, checked against the fingerprints the merge recorded; a wrong, missing or changed file is refused by
name and changes nothing.

Oracle: the file's tensors as safetensors' own reader gives them, cast with torch's `.to` (what a loader does).
"""

from __future__ import annotations

import pytest
import torch
from lora_factory import TINY
from safetensors.torch import load_file, save_file
from tensor_checks import differing, snapshot

from lora_ops import (
    LoRAOpsError,
    MergeOptions,
    find_model_file,
    load_lora,
    merge_loras,
    merged_keys,
    reload_weights,
    restore,
    restore_from_file,
)
from lora_ops.errors import UndoError
from lora_ops.flux import FluxShape
from lora_ops.reload import weight_fingerprint
from lora_ops.safetensors_io import SafetensorsFile
from lora_ops.synthetic import write_flux_checkpoint, write_kohya_lora

TILE = 8 * 1024  # several tiles per weight
PREFIX = "model.diffusion_model."

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reload")
    return {
        "model": write_flux_checkpoint(d / "model.safetensors", TINY, seed=5),
        "other": write_flux_checkpoint(d / "other.safetensors", TINY, seed=6),
        "prefixed": write_flux_checkpoint(d / "prefixed.safetensors", TINY, seed=5, prefix=PREFIX),
        "lora": write_kohya_lora(d / "lora.safetensors", TINY, rank=4, relative_change=0.05),
    }


@pytest.fixture(scope="module")
def lora(files):
    return load_lora(files["lora"])


def loaded(path, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """The file as a loader gives it: bare names, cast to `dtype`."""
    return {k.removeprefix(PREFIX): v.to(dtype) for k, v in load_file(str(path)).items()}


def broken_undo(sd, state) -> str:
    """Add 0.01 to one merged element the journal does not hold (behind the engine's back): restore then raises
    UndoError. Returns the weight changed. (One ulp can vanish when the merge made the element smaller.)"""
    key = sorted(state.fingerprints)[2]
    numel = sd[key].numel()
    journal = state.journals[key]
    journaled = set(journal.lookup(0, numel)[0].tolist()) if journal.entries else set()
    at = next(i for i in range(numel) if i not in journaled)
    sd[key].reshape(-1)[at] += 0.01
    with pytest.raises(UndoError) as caught:
        restore(sd, state, tile_bytes=TILE)
    assert caught.value.keys == [key] and caught.value.unchanged
    return key


def test_the_fingerprint_of_a_whole_weight_is_the_one_the_merge_built_tile_by_tile(files, lora):
    sd = loaded(files["model"])
    original = snapshot(sd)
    state = merge_loras(sd, [(lora, 0.9)], tile_bytes=TILE)
    assert max(sd[k].shape[0] for k in state.fingerprints) > 32  # TILE makes 32-row tiles: several per weight
    for key, recorded in state.fingerprints.items():
        assert torch.equal(weight_fingerprint(original[key]), recorded), key
        assert not torch.equal(weight_fingerprint(sd[key]), recorded), key  # merged bits differ


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("source", ["model", "prefixed"])
def test_an_impossible_undo_is_repaired_from_the_file(files, lora, dtype, source):
    sd = loaded(files["model"], dtype)
    state = merge_loras(sd, [(lora, 1.3)], tile_bytes=TILE)
    broken_undo(sd, state)
    empty = restore_from_file(sd, files[source], state)
    assert not empty.stack and not empty.fingerprints
    assert not differing(sd, loaded(files["model"], dtype)), "reloaded weights differ from the file's bits"
    merge_loras(sd, [(lora, 0.5)], state=empty, tile_bytes=TILE)  # a fresh merge from the reloaded base works
    assert differing(sd, loaded(files["model"], dtype))


def test_the_state_names_every_merged_weight_and_only_those(files, lora):
    sd = loaded(files["model"])
    state = merge_loras(sd, [(lora, 1.0)], tile_bytes=TILE)
    changed = set(differing(sd, loaded(files["model"])))
    assert changed and changed <= set(merged_keys(state)) <= set(lora.targets)
    assert merged_keys(merge_loras(loaded(files["model"]), [(lora, 0.0)])) == []


def test_a_merge_without_a_journal_is_restored_from_the_file(files, lora):
    sd = loaded(files["model"])
    state = merge_loras(sd, [(lora, 1.0)], options=MergeOptions(exact_undo=False))
    with pytest.raises(LoRAOpsError, match="exact_undo=False"):
        restore(sd, state)
    restore_from_file(sd, files["model"], state)
    assert not differing(sd, loaded(files["model"]))


def test_another_file_is_refused_by_name_and_nothing_changes(files, lora):
    sd = loaded(files["model"])
    state = merge_loras(sd, [(lora, 1.0)], tile_bytes=TILE)
    before = snapshot(sd)
    with pytest.raises(LoRAOpsError) as caught:
        restore_from_file(sd, files["other"], state)
    text = str(caught.value)
    assert str(files["other"]) in text and "fingerprint" in text and "not the file the model was loaded from" in text
    assert merged_keys(state)[0] in text and "Reload the model" in text
    assert not differing(sd, before)


def test_a_file_missing_a_weight_or_with_another_shape_is_refused_and_nothing_changes(files, lora, tmp_path):
    sd = loaded(files["model"])
    state = merge_loras(sd, [(lora, 1.0)], tile_bytes=TILE)
    before = snapshot(sd)
    gone = merged_keys(state)[-1]
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in load_file(str(files["model"])).items() if k != gone}, str(partial))
    with pytest.raises(LoRAOpsError, match=f"{partial}: has no tensor for '{gone}'"):
        restore_from_file(sd, partial, state)
    wide = write_flux_checkpoint(tmp_path / "wide.safetensors", FluxShape(**{**TINY.__dict__, "hidden": 64}), seed=5)
    with pytest.raises(LoRAOpsError, match="has shape"):
        restore_from_file(sd, wide, state)
    with pytest.raises(LoRAOpsError, match="is not there"):
        restore_from_file(sd, tmp_path / "moved.safetensors", state)
    assert not differing(sd, before)


def test_only_the_requested_weights_are_written(files, lora):
    sd = loaded(files["model"])
    state = merge_loras(sd, [(lora, 1.0)], tile_bytes=TILE)
    merged = snapshot(sd)
    keys = merged_keys(state)[:3]
    assert reload_weights(sd, files["model"], keys, state.fingerprints, keep_bytes=0) == keys
    assert set(differing(sd, merged)) == set(keys)
    original = loaded(files["model"])
    assert not differing({k: sd[k] for k in keys}, {k: original[k] for k in keys})


def test_a_file_that_changes_between_the_check_and_the_write_is_reported(files, lora, monkeypatch):
    sd = loaded(files["model"])
    state = merge_loras(sd, [(lora, 1.0)], tile_bytes=TILE)
    keys = merged_keys(state)
    reads, real_get = [], SafetensorsFile.get

    def get(self, key):
        reads.append(key)
        value = real_get(self, key)
        return value if len(reads) <= len(keys) + 1 else value * 2  # the second pass's second read is wrong

    monkeypatch.setattr(SafetensorsFile, "get", get)
    with pytest.raises(LoRAOpsError, match="changed while it was read: 1 of"):
        restore_from_file(sd, files["model"], state, keep_bytes=0)


def test_weights_without_a_fingerprint_or_scaled_fp8_are_refused(files, lora):
    sd = loaded(files["model"])
    state = merge_loras(sd, [(lora, 1.0)], tile_bytes=TILE)
    before = snapshot(sd)
    key = merged_keys(state)[1]
    with pytest.raises(LoRAOpsError, match=f"'{key}': no fingerprint"):
        reload_weights(sd, files["model"], [key], {})
    state.codec_state[f"fp8_base_scale:{key}"] = 1.0
    with pytest.raises(LoRAOpsError, match=f"'{key}' is a scaled fp8 weight"):
        restore_from_file(sd, files["model"], state)
    assert not differing(sd, before)


def test_the_model_file_is_found_among_candidates(files, lora, tmp_path):
    sd = loaded(files["model"], torch.float16)
    state = merge_loras(sd, [(lora, 1.0)], tile_bytes=TILE)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    reads = []
    real_get = SafetensorsFile.get
    counted_get = lambda self, key: reads.append(key) or real_get(self, key)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SafetensorsFile, "get", counted_get)
        found = find_model_file([tmp_path / "gone.safetensors", junk, files["other"], files["prefixed"]], sd,
                                state.fingerprints)
    assert found == files["prefixed"]
    assert len(reads) == 2  # one small weight read from each file whose header fits
    assert find_model_file([files["other"], junk], sd, state.fingerprints) is None


def test_comfyuis_norm_weight_names_are_read_from_the_files_norm_scales(files):
    """ComfyUI 0.33 loads Flux's qk-norm `..._norm.scale` as `..._norm.weight` (supported_models.py)."""
    original = loaded(files["model"])
    scale = "double_blocks.0.img_attn.norm.key_norm.scale"
    live = {scale.removesuffix("scale") + "weight": torch.zeros_like(original[scale])}
    key = next(iter(live))
    assert reload_weights(live, files["model"], [key], {key: weight_fingerprint(original[scale])}) == [key]
    assert torch.equal(live[key].view(torch.int16), original[scale].view(torch.int16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: fingerprints recorded on the GPU")
def test_weights_merged_on_a_gpu_are_reloaded_from_the_file(files, lora):
    """The merge fingerprints tiles on the GPU (float64 matrix-vector product), the reload on the CPU (numpy's
    wrapping int32 sums): the two must agree, and the file's bits land on the GPU tensors."""
    sd = {k: v.cuda() for k, v in loaded(files["model"]).items()}
    state = merge_loras(sd, [(lora, 1.3)], tile_bytes=TILE)
    assert {a.device for a in state.arithmetic.values()} == {"cuda:0"}
    broken_undo(sd, state)
    restore_from_file(sd, files["model"], state)
    assert all(v.is_cuda for v in sd.values())
    assert not differing({k: v.cpu() for k, v in sd.items()}, loaded(files["model"]))
