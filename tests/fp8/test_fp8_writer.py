"""Writing fp8 files: the CLI's merge --dtype fp8 and cast (lora_ops.fp8.writer)."""

from __future__ import annotations

import json

import pytest
import torch
from fp8_cases import E4M3, SMALL, file_sizes
from tensor_checks import assert_same_bits

from lora_ops import fp8, load_lora
from lora_ops.flux import flux_weight_shapes
from lora_ops.safetensors_io import SafetensorsFile


@pytest.mark.parametrize(("policy", "file_format"), [("default", "comfy_quant"), ("quality", "comfy_quant"),
                                                     ("all", "comfy_quant"), ("default", "scaled_fp8")])
def test_cli_merge_fp8_file(small_files, policy, file_format):
    from lora_ops.cli import main

    d, ckpt, lora_path = small_files
    out = d / f"merged_{policy}_{file_format}.safetensors"
    args = ["merge", str(ckpt), "--lora", f"{lora_path}:0.8", "--out", str(out), "--dtype", "fp8", "--policy", policy]
    assert main(args + (["--format", file_format] if file_format != "comfy_quant" else [])) == 0
    st = SafetensorsFile(out)
    pol = fp8.get_policy(policy)
    shapes = flux_weight_shapes(SMALL)
    fp8_layers = [key[: -len(".weight")] for key, shape in shapes.items() if pol.selects(key, shape)]
    if file_format == "scaled_fp8":
        assert st.dtype("scaled_fp8") == E4M3 and st.shape("scaled_fp8") == (2,)
        assert fp8.QUANT_METADATA not in st.metadata
    else:
        assert "scaled_fp8" not in st.keys()
        header = json.loads(st.metadata[fp8.QUANT_METADATA])
        layer_conf = {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
        assert header == {"format_version": "1.0", "layers": dict.fromkeys(fp8_layers, layer_conf)}
        for layer in fp8_layers:
            assert json.loads(bytes(st.get(layer + ".comfy_quant").tolist())) == layer_conf
    scale_suffix = ".weight_scale" if file_format == "comfy_quant" else ".scale_weight"
    for key, shape in shapes.items():
        if pol.selects(key, shape):
            assert st.dtype(key) == E4M3
            skey = key[: -len(".weight")] + scale_suffix
            assert st.dtype(skey) == torch.float32 and st.shape(skey) == ()
        else:
            assert st.dtype(key) == torch.bfloat16
    size = fp8.policy_size(SMALL, policy)
    file_size, header_size = file_sizes(out)
    # tensor bytes: exactly the arithmetic (a comfy_quant file has layout bytes per layer instead of the marker)
    layout_bytes = sum(st.get(k).numel() for k in st.keys() if k.endswith(".comfy_quant"))
    marker_bytes = size.marker_bytes if file_format == "scaled_fp8" else 0
    assert file_size - 8 - header_size == size.total - size.marker_bytes + marker_bytes + layout_bytes
    assert abs(file_size - size.total) / size.total < 0.02
    # the same as the in-memory merge, and the same fp8 bits and scales in either format
    stack = [(load_lora(lora_path), 0.8)]
    expected = fp8.merge_to_fp8(dict(SafetensorsFile(ckpt).iter_tensors()), stack, policy, file_format=file_format)
    got = dict(st.iter_tensors())
    assert_same_bits(expected, got)
    other = "scaled_fp8" if file_format == "comfy_quant" else "comfy_quant"
    mine, theirs = fp8.load_fp8_state_dict(out), fp8.load_fp8_state_dict(
        fp8.merge_to_fp8(dict(SafetensorsFile(ckpt).iter_tensors()), stack, policy, file_format=other))
    assert mine.kind == file_format and theirs.kind == other
    assert_same_bits(mine.tensors, theirs.tensors)
    assert_same_bits(mine.scales, theirs.scales)


def test_cli_cast_and_errors(small_files, capsys):
    from lora_ops.cli import main

    d, ckpt, lora_path = small_files
    out = d / "cast.safetensors"
    assert main(["cast", str(ckpt), "--out", str(out), "--policy", "quality", "--rounding", "stochastic",
                 "--seed", "1", "--fp8-matmul"]) == 0
    ck = fp8.load_fp8_state_dict(out)
    assert ck.kind == "comfy_quant" and ck.fp8_matmul is True
    assert main(["cast", str(ckpt), "--out", str(d / "cast_old.safetensors"), "--format", "scaled_fp8"]) == 0
    old = fp8.load_fp8_state_dict(d / "cast_old.safetensors")
    assert old.kind == "scaled_fp8" and old.fp8_matmul is False
    assert ck.tensors["double_blocks.0.img_mod.lin.weight"].dtype == torch.bfloat16
    assert "policy quality, comfy_quant format" in capsys.readouterr().out
    assert main(["cast", str(ckpt), "--out", str(d / "x.safetensors"), "--policy", "nope"]) == 2
    assert "unknown fp8 policy" in capsys.readouterr().err
    assert not (d / "x.safetensors").exists()
    assert main(["cast", str(ckpt), "--out", str(ckpt)]) == 2
    # re-casting an fp8 file from Python
    again = d / "again.safetensors"
    fp8.merge_checkpoint_fp8(out, [], again, policy="default")
    assert fp8.load_fp8_state_dict(again).tensors["double_blocks.0.img_mod.lin.weight"].dtype == E4M3


def test_cli_refuses_broken_fp8_input(small_files, tmp_path, capsys):
    from safetensors.torch import save_file

    from lora_ops.cli import main

    _, ckpt, _ = small_files
    sd = fp8.merge_to_fp8(dict(SafetensorsFile(ckpt).iter_tensors()), [], "default", file_format="scaled_fp8")
    sd["single_blocks.0.linear1.scale_weight"] = torch.tensor(0.0)
    save_file(sd, str(tmp_path / "zero.safetensors"))
    assert main(["cast", str(tmp_path / "zero.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "single_blocks.0.linear1.scale_weight" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_converting_between_the_two_formats_keeps_bits_and_drops_a_stale_header(small_files):
    """comfy_quant file → scaled_fp8 file → comfy_quant file: the same fp8 bits and scales; the scaled_fp8 file has
    no `_quantization_metadata` left (ComfyUI would trust it over the marker)."""
    d, ckpt, _ = small_files
    first, second, third = (d / f"conv{i}.safetensors" for i in range(3))
    fp8.merge_checkpoint_fp8(ckpt, [], first, policy="default")
    fp8.merge_checkpoint_fp8(first, [], second, policy="default", file_format="scaled_fp8")
    fp8.merge_checkpoint_fp8(second, [], third, policy="default")
    assert fp8.QUANT_METADATA not in SafetensorsFile(second).metadata
    a, b, c = (fp8.load_fp8_state_dict(p) for p in (first, second, third))
    assert (a.kind, b.kind, c.kind) == ("comfy_quant", "scaled_fp8", "comfy_quant")
    for other in (b, c):
        assert_same_bits(a.tensors, other.tensors)
        assert_same_bits(a.scales, other.scales)
