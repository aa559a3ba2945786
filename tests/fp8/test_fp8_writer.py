"""Writing fp8 files: the CLI's merge --dtype fp8 and cast (lora_ops.fp8.writer)."""

from __future__ import annotations

import pytest
import torch
from fp8_cases import (
    E4M3,
    SMALL,
    assert_same_bits,
    file_sizes,
)

from lora_ops import fp8, load_lora
from lora_ops.flux import flux_weight_shapes
from lora_ops.safetensors_io import SafetensorsFile


@pytest.mark.parametrize("policy", ["default", "quality", "all"])
def test_cli_merge_fp8_file(small_files, policy):
    from lora_ops.cli import main

    d, ckpt, lora_path = small_files
    out = d / f"merged_{policy}.safetensors"
    assert main(["merge", str(ckpt), "--lora", f"{lora_path}:0.8", "--out", str(out), "--dtype", "fp8",
                 "--policy", policy]) == 0
    st = SafetensorsFile(out)
    assert st.dtype("scaled_fp8") == E4M3 and st.shape("scaled_fp8") == (2,)
    pol = fp8.get_policy(policy)
    shapes = flux_weight_shapes(SMALL)
    for key, shape in shapes.items():
        if pol.selects(key, shape):
            assert st.dtype(key) == E4M3
            skey = key[: -len(".weight")] + ".scale_weight"
            assert st.dtype(skey) == torch.float32 and st.shape(skey) == ()
        else:
            assert st.dtype(key) == torch.bfloat16
    size = fp8.policy_size(SMALL, policy)
    file_size, header = file_sizes(out)
    assert file_size - 8 - header == size.total  # tensor bytes: exactly the arithmetic
    assert abs(file_size - size.total) / size.total < 0.02
    # the same as the in-memory merge
    stack = [(load_lora(lora_path), 0.8)]
    expected = fp8.merge_to_fp8(dict(SafetensorsFile(ckpt).iter_tensors()), stack, policy)
    got = dict(st.iter_tensors())
    assert_same_bits(expected, got)


def test_cli_cast_and_errors(small_files, capsys):
    from lora_ops.cli import main

    d, ckpt, lora_path = small_files
    out = d / "cast.safetensors"
    assert main(["cast", str(ckpt), "--out", str(out), "--policy", "quality", "--rounding", "stochastic",
                 "--seed", "1", "--fp8-matmul"]) == 0
    ck = fp8.load_fp8_state_dict(out)
    assert ck.kind == "scaled_fp8" and ck.fp8_matmul is True
    assert ck.tensors["double_blocks.0.img_mod.lin.weight"].dtype == torch.bfloat16
    assert "policy quality" in capsys.readouterr().out
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
    sd = fp8.merge_to_fp8(dict(SafetensorsFile(ckpt).iter_tensors()), [], "default")
    sd["single_blocks.0.linear1.scale_weight"] = torch.tensor(0.0)
    save_file(sd, str(tmp_path / "zero.safetensors"))
    assert main(["cast", str(tmp_path / "zero.safetensors"), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "single_blocks.0.linear1.scale_weight" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
