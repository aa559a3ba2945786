"""The pack's node registration in a real ComfyUI server (point 6 of the issue): the V3 registration (this server)
and the V1 fallback (a second server with FLUX_LORA_OPS_FORCE_V1=1) expose the same nodes, and the V1 nodes merge
the same.
"""

from __future__ import annotations

from comfy_harness import PACK_DIR_NAME
from node_server import (
    assert_file_equals,
    fresh_merge,
    load_node,
    merge_node,
    save_node,
    saved_file,
    start_server,
    unet,
    unique,
)

OUR_NODES = ("LoadFluxLoRA", "MergeLoRAIntoModel", "CastFluxFP8", "VRAMReport", "ResizeFluxLoRA")


def _node_signature(info: dict) -> dict:
    """What a user sees of a node in /object_info: inputs (group, type, has tooltip), outputs, category."""
    inputs = {}
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind = spec[0] if isinstance(spec[0], str) else "COMBO"
            inputs[name] = (group, kind, bool(len(spec) > 1 and spec[1].get("tooltip")))
    return {
        "inputs": inputs,
        "outputs": list(info["output"]),
        "output_names": list(info["output_name"]),
        "category": info["category"],
        "output_node": info["output_node"],
        "has_description": bool(info["description"]),
    }


def test_v3_registration_exposes_the_nodes(comfy_server):
    info = comfy_server.object_info()
    for name in OUR_NODES:
        assert name in info, name
        sig = _node_signature(info[name])
        assert sig["category"] == "Flux LoRA Ops" and sig["has_description"]
        assert all(tooltip for _, _, tooltip in sig["inputs"].values()), (name, sig)
    assert info["LoadFluxLoRA"]["output"] == ["FLUX_LORA_STACK", "STRING", "CLIP"]
    assert info["VRAMReport"]["output"] == ["*", "STRING", "IMAGE"] and info["VRAMReport"]["output_node"]
    assert info["MergeLoRAIntoModel"]["output"] == ["MODEL"]
    failed = [line for line in comfy_server.log_text().splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if line.rstrip().endswith(PACK_DIR_NAME)], failed


def test_v1_fallback_registration_same_nodes(comfy_server, flux_tiny_checkpoint, tmp_path, monkeypatch, base, loras):
    """A second server with FLUX_LORA_OPS_FORCE_V1=1: the V1 classes expose the same nodes and merge the same."""
    v3_info = {name: _node_signature(comfy_server.object_info(name)[name]) for name in OUR_NODES}
    server = start_server(
        comfy_server.comfyui_root, tmp_path / "v1_base", flux_tiny_checkpoint, monkeypatch, FLUX_LORA_OPS_FORCE_V1="1"
    )
    try:
        for name in OUR_NODES:
            info = server.object_info(name)
            assert name in info, name
            assert _node_signature(info[name]) == v3_info[name], name
            assert info[name]["python_module"] == comfy_server.object_info(name)[name]["python_module"]
        server.add_lora(comfy_server.loras_dir / loras["small"])
        prefix = unique("v1_merged")
        entry = server.run(
            {
                "unet": unet(),
                "lora": load_node(loras["small"], 0.5),
                "merge": merge_node("unet", "lora"),
                "save": save_node("merge", prefix),
                "report": {"class_type": "VRAMReport", "inputs": {"passthrough": ["merge", 0]}},
            },
            timeout=1800,
        )
        assert "Process RSS" in entry["outputs"]["report"]["text"][0]
        assert_file_equals(saved_file(server, prefix), fresh_merge(comfy_server, base, [(loras["small"], 0.5)]))
        failed = [line for line in server.log_text().splitlines() if "IMPORT FAILED" in line]
        assert not [line for line in failed if line.rstrip().endswith(PACK_DIR_NAME)], failed
    finally:
        server.stop()
