"""Generators of bad files: broken safetensors, pickles, broken or foreign LoRAs, models that are not Flux.

Each `Hostile` case writes one file into a directory and says how it must be refused:

* stage "load": `load_lora` refuses it (`UnsafeFileError` for a broken file, `LoRAFormatError` for a broken
  or foreign LoRA), so `inspect` and `merge` refuse it too;
* stage "fit": the file is a well-formed LoRA, but not for this model: `merge_loras` /
  `offline.merge_checkpoint` refuse it (`ModelMismatchError`) before any weight changes;
* stage "model": the file is given as the *model* of an offline merge.

`key` is the tensor key the message must name (None where the problem is not one key) and `words` a regex
for the problem. Pickle cases carry a `__reduce__` payload that creates `SENTINEL` next to the file if it is
ever unpickled.

Models and LoRAs here are for `lora_factory.TINY` (hidden 32); `model_state_dict()` is the model the fit
cases are refused by.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lora_factory import TINY, base_state_dict, lora_factors, write_lora
from safetensors.torch import save_file

from lora_ops.flux import FluxShape, flux_weight_shapes

MODEL_SEED = 11
#: What every pickle refusal says.
PICKLE = r"pickle.*convert it to \.safetensors"
LORA_SEED = 5
RANK = 4
#: The module the hand-made kohya LoRAs change (fused qkv of double block 0) and its key stem.
MODULE = "double_blocks.0.img_attn.qkv"
STEM = "lora_unet_double_blocks_0_img_attn_qkv"
DOWN, UP, ALPHA = f"{STEM}.lora_down.weight", f"{STEM}.lora_up.weight", f"{STEM}.alpha"
#: A second, plain module (single block 0 linear2) so that the files have more than one target.
STEM2 = "lora_unet_single_blocks_0_linear2"
#: Name of the file a pickle payload creates when unpickled.
SENTINEL = "UNPICKLED-SENTINEL"


def model_state_dict(shape: FluxShape = TINY) -> dict[str, torch.Tensor]:
    return base_state_dict(shape, MODEL_SEED)


def write_model(path: Path, shape: FluxShape = TINY) -> Path:
    save_file(model_state_dict(shape), str(path), metadata={"format": "pt"})
    return path


# ------------------------------------------------------------------------------------------------ raw bytes


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors-like file: 8-byte little-endian header length, header bytes, data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if header_len is None else header_len) + body + data)
    return path


def header_of(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _f32(key: str, shape: list[int], begin: int) -> dict:
    n = 4
    for d in shape:
        n *= d
    return {key: {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}}


# ------------------------------------------------------------------------------------------------ valid LoRAs


def kohya_tensors(shape: FluxShape = TINY, rank: int = RANK, alpha: float | None = RANK / 2
                  ) -> dict[str, torch.Tensor]:
    """A small valid kohya LoRA on MODULE and single_blocks.0.linear2 (bf16 factors, like the factory's)."""
    out: dict[str, torch.Tensor] = {}
    shapes = flux_weight_shapes(shape)
    for stem, module in ((STEM, MODULE), (STEM2, "single_blocks.0.linear2")):
        rows, cols = shapes[f"{module}.weight"]
        down, up = lora_factors(LORA_SEED, module, rows, cols, rank)
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        if alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.bfloat16)
    return out


def write_valid_lora(path: Path) -> Path:
    save_file(kohya_tensors(), str(path))
    return path


def _save(tensors: dict[str, torch.Tensor]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    return make


def _mutated(**changes: torch.Tensor | None) -> Callable[[Path], Path]:
    """The valid LoRA with some keys replaced (None removes a key). Keys are given with '.' as '__'."""

    def make(path: Path) -> Path:
        tensors = kohya_tensors()
        for name, value in changes.items():
            key = name.replace("__", ".")
            if value is None:
                tensors.pop(key)
            else:
                tensors[key] = value
        return _save(tensors)(path)

    return make


def _with(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        tensors = kohya_tensors()
        tensors[key] = fn(tensors[key])
        return _save(tensors)(path)

    return make


def _poke(value: float, index: tuple[int, int] = (1, 2)) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return fn


def _cut(fraction_or_bytes: float | int, where: str) -> Callable[[Path], Path]:
    """The valid LoRA, truncated inside its header or inside its data."""

    def make(path: Path) -> Path:
        write_valid_lora(path)
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        keep = 8 + int(n * fraction_or_bytes) if where == "header" else len(raw) - int(fraction_or_bytes)
        path.write_bytes(raw[:keep])
        return path

    return make


def _last_tensor_key(path: Path) -> str:
    header = header_of(path)
    header.pop("__metadata__", None)
    return max(header, key=lambda k: header[k]["data_offsets"][1])


# ------------------------------------------------------------------------------------------------ pickles


class _Payload:
    """Unpickling this creates a directory: proof that a loader ran pickle code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def _pickle_bytes(path: Path, protocol: int) -> bytes:
    return pickle.dumps({"state_dict": {"w": [0.0] * 4}, "x": _Payload(str(path.parent / SENTINEL))},
                        protocol=protocol)


def _pickle(protocol: int) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(_pickle_bytes(path, protocol))
        return path

    return make


def _torch_save(zip_format: bool) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        obj = {DOWN: torch.zeros(4, 32), "payload": _Payload(str(path.parent / SENTINEL))}
        torch.save(obj, str(path), _use_new_zipfile_serialization=zip_format)
        return path

    return make


# ------------------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Hostile:
    name: str
    filename: str
    make: Callable[[Path], Path]
    error: str  # class name in lora_ops.errors
    words: str  # regex (case-insensitive) for the problem
    key: str | Callable[[Path], str] | None = None
    stage: str = "load"  # load | fit | model

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return self.make(directory / self.filename)

    def key_for(self, path: Path) -> str | None:
        return self.key(path) if callable(self.key) else self.key


def _sparse_huge_header(path: Path) -> Path:
    """A 300 MB sparse file whose header length claims (nearly) all of it."""
    size = 300 * 2**20
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", size - 8))
        f.truncate(size)
    return path


def _two_tensors(path: Path, a: list[int], b: list[int], size: int = 8, data_len: int = 16) -> Path:
    header = {"a": {"dtype": "F32", "shape": [size // 4], "data_offsets": a},
              "b": {"dtype": "F32", "shape": [size // 4], "data_offsets": b}}
    return raw_file(path, header, b"\0" * data_len)


def _conv_factors(path: Path) -> Path:
    tensors = kohya_tensors()
    tensors[DOWN] = torch.randn(RANK, TINY.hidden, 3, 3).to(torch.bfloat16)
    return _save(tensors)(path)


def _two_schemes_prefix(path: Path) -> Path:
    """The same LoRA on MODULE under kohya names and BFL names."""
    tensors = kohya_tensors()
    tensors[f"diffusion_model.{MODULE}.lora_down.weight"] = tensors[DOWN].clone()
    tensors[f"diffusion_model.{MODULE}.lora_up.weight"] = tensors[UP].clone()
    return _save(tensors)(path)


def _two_schemes_suffix(path: Path) -> Path:
    """kohya lora_down/lora_up and PEFT lora_A/lora_B on one module name."""
    tensors = kohya_tensors()
    tensors[f"{STEM}.lora_A.weight"] = tensors[DOWN].clone()
    tensors[f"{STEM}.lora_B.weight"] = tensors[UP].clone()
    return _save(tensors)(path)


def _two_schemes_split(path: Path) -> Path:
    """BFL qkv (kohya) plus a diffusers to_k on the same rows."""
    tensors = kohya_tensors()
    h = TINY.hidden
    tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = tensors[DOWN].clone()
    tensors["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = tensors[UP][h : 2 * h].clone()
    return _save(tensors)(path)


def _sd3_kohya(path: Path) -> Path:
    g = torch.Generator().manual_seed(3)
    t = {}
    for i in range(2):
        for m in ("x_block_attn_qkv", "context_block_attn_proj", "x_block_mlp_fc1"):
            stem = f"lora_unet_joint_blocks_{i}_{m}"
            t[f"{stem}.lora_down.weight"] = torch.randn(4, 64, generator=g)
            t[f"{stem}.lora_up.weight"] = torch.randn(192, 4, generator=g)
            t[f"{stem}.alpha"] = torch.tensor(4.0)
    return _save(t)(path)


def _sd3_diffusers(path: Path) -> Path:
    """SD3's diffusers names are Flux's double-block names: it loads, and its 24-wide shapes do not fit."""
    g = torch.Generator().manual_seed(4)
    t = {}
    for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2"):
        t[f"transformer.transformer_blocks.0.{m}.lora_A.weight"] = torch.randn(4, 24, generator=g)
        t[f"transformer.transformer_blocks.0.{m}.lora_B.weight"] = torch.randn(24, 4, generator=g)
    return _save(t)(path)


def _text_encoder_only(path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    t = {}
    for stem in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_encoder_block_0_layer_0_SelfAttention_q"):
        t[f"{stem}.lora_down.weight"] = torch.randn(4, 24, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(24, 4, generator=g)
        t[f"{stem}.alpha"] = torch.tensor(2.0)
    return _save(t)(path)


def _peft(metadata: str) -> Callable[[Path], Path]:
    """A diffusers (PEFT) LoRA without alpha keys whose `lora_adapter_metadata` header entry is `metadata`."""

    def make(path: Path) -> Path:
        h = TINY.hidden
        down, up = lora_factors(LORA_SEED, MODULE, 3 * h, h, RANK)
        tensors = {f"transformer.transformer_blocks.0.attn.{n}.lora_{ab}.weight": t.clone()
                   for i, n in enumerate(("to_q", "to_k", "to_v"))
                   for ab, t in (("A", down), ("B", up[i * h : (i + 1) * h]))}
        save_file(tensors, str(path), metadata={"lora_adapter_metadata": metadata})
        return path

    return make


def _factory(fmt: str, shape: FluxShape = TINY, **kw) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        write_lora(fmt, path, shape, RANK, LORA_SEED, **kw)
        return path

    return make


def _deeper_lora(path: Path) -> Path:
    """A LoRA on double block 5 (TINY has 2)."""
    rows, cols = 3 * TINY.hidden, TINY.hidden
    down, up = lora_factors(LORA_SEED, "double_blocks.5.img_attn.qkv", rows, cols, RANK)
    return _save({"lora_unet_double_blocks_5_img_attn_qkv.lora_down.weight": down,
                  "lora_unet_double_blocks_5_img_attn_qkv.lora_up.weight": up})(path)


def _not_flux_model(path: Path) -> Path:
    g = torch.Generator().manual_seed(6)
    t = {f"input_blocks.{i}.0.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16) for i in range(3)}
    t["middle_block.1.proj_in.weight"] = torch.randn(8, 8, generator=g).to(torch.bfloat16)
    return _save(t)(path)


def _truncated_model(path: Path) -> Path:
    write_model(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    return path


HOSTILE: tuple[Hostile, ...] = (
    # --- the file is not well-formed safetensors ------------------------------------------------------------
    Hostile("empty", "empty.safetensors", lambda p: (p.write_bytes(b""), p)[1], "UnsafeFileError", r"0 bytes"),
    Hostile("five_bytes", "short.safetensors", lambda p: (p.write_bytes(b"\x10\0\0\0\0"), p)[1],
            "UnsafeFileError", r"5 bytes"),
    Hostile("truncated_in_header", "cut_header.safetensors", _cut(0.5, "header"), "UnsafeFileError",
            r"runs past the end"),
    Hostile("truncated_in_data", "cut_data.safetensors", _cut(10, "data"), "UnsafeFileError",
            r"runs past the end", key=_last_tensor_key),
    Hostile("header_len_past_eof", "past_eof.safetensors",
            lambda p: raw_file(p, _f32("a", [2], 0), b"\0" * 8, header_len=4096), "UnsafeFileError",
            r"runs past the end"),
    Hostile("header_claims_512MB", "huge_header.safetensors",
            lambda p: raw_file(p, b"{}", header_len=512 * 2**20), "UnsafeFileError", r"claim.*limit"),
    Hostile("header_claims_300MB_sparse", "huge_sparse.safetensors", _sparse_huge_header, "UnsafeFileError",
            r"claim.*limit"),
    Hostile("header_claims_u64_max", "u64.safetensors", lambda p: raw_file(p, b"{}", header_len=2**64 - 1),
            "UnsafeFileError", r"claim.*limit"),
    Hostile("header_not_json", "not_json.safetensors", lambda p: raw_file(p, b"this is not json at all!"),
            "UnsafeFileError", r"not valid safetensors JSON"),
    Hostile("header_not_utf8", "not_utf8.safetensors", lambda p: raw_file(p, b"{\xff\xfe\xfd}   "),
            "UnsafeFileError", r"not valid safetensors JSON"),
    Hostile("header_json_list", "list.safetensors", lambda p: raw_file(p, b"[1, 2, 3]"), "UnsafeFileError",
            r"not a JSON object"),
    Hostile("header_nested_deep", "deep.safetensors", lambda p: raw_file(p, b"[" * 200_000),
            "UnsafeFileError", r"nested too deeply"),
    Hostile("header_duplicate_key", "dup.safetensors",
            lambda p: raw_file(p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                  b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8),
            "UnsafeFileError", r"appears twice", key="a"),
    Hostile("bad_dtype", "dtype.safetensors",
            lambda p: raw_file(p, {"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "UnsafeFileError", r"unsupported dtype", key="w"),
    Hostile("bad_shape", "shape.safetensors",
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "UnsafeFileError", r"invalid shape", key="w"),
    Hostile("offsets_overlap", "overlap.safetensors", lambda p: _two_tensors(p, [0, 8], [4, 12]),
            "UnsafeFileError", r"overlap", key="b"),
    Hostile("offsets_out_of_range", "range.safetensors", lambda p: _two_tensors(p, [0, 8], [8, 16], data_len=12),
            "UnsafeFileError", r"runs past the end", key="b"),
    Hostile("offsets_huge", "huge_off.safetensors",
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [2**62, 2**62 + 8]}},
                               b"\0" * 8), "UnsafeFileError", r"runs past the end", key="w"),
    Hostile("offsets_reversed", "reversed.safetensors", lambda p: _two_tensors(p, [8, 0], [8, 16]),
            "UnsafeFileError", r"invalid data_offsets", key="a"),
    Hostile("offsets_size_mismatch", "size.safetensors",
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "UnsafeFileError", r"bytes stored for shape", key="w"),
    Hostile("offsets_gap", "gap.safetensors", lambda p: _two_tensors(p, [0, 8], [12, 20], data_len=20),
            "UnsafeFileError", r"gap", key="b"),
    Hostile("trailing_bytes", "trailing.safetensors", lambda p: _two_tensors(p, [0, 8], [8, 16], data_len=24),
            "UnsafeFileError", r"belong to no tensor", key="b"),
    Hostile("metadata_not_strings", "meta.safetensors",
            lambda p: raw_file(p, {"__metadata__": {"rank": 4}, **_f32("w", [2], 0)}, b"\0" * 8),
            "UnsafeFileError", r"__metadata__"),
    # --- pickles: never unpickled ---------------------------------------------------------------------------
    Hostile("pickle_pt_zip", "lora.pt", _torch_save(True), "UnsafeFileError", PICKLE),
    Hostile("pickle_ckpt_legacy", "lora.ckpt", _torch_save(False), "UnsafeFileError",
            PICKLE),
    Hostile("pickle_zip_renamed", "zip_renamed.safetensors", _torch_save(True), "UnsafeFileError",
            PICKLE),
    Hostile("pickle_p2_renamed", "p2.safetensors", _pickle(2), "UnsafeFileError", PICKLE),
    Hostile("pickle_p5_renamed", "p5.safetensors", _pickle(5), "UnsafeFileError", PICKLE),
    Hostile("pickle_p0_renamed", "p0.safetensors", _pickle(0), "UnsafeFileError", PICKLE),
    # --- broken LoRA factors ----------------------------------------------------------------------------------
    Hostile("factor_bool", "bool.safetensors", _with(UP, lambda t: t > 0), "LoRAFormatError", r"torch\.bool",
            key=UP),
    Hostile("factor_int32", "int32.safetensors", _with(DOWN, lambda t: (t * 100).to(torch.int32)),
            "LoRAFormatError", r"torch\.int32", key=DOWN),
    Hostile("factor_int8", "int8.safetensors", _with(UP, lambda t: (t * 100).to(torch.int8)), "LoRAFormatError",
            r"torch\.int8", key=UP),
    Hostile("factor_fp8", "fp8.safetensors", _with(DOWN, lambda t: t.to(torch.float8_e4m3fn)), "LoRAFormatError",
            r"float8_e4m3fn", key=DOWN),
    Hostile("factor_nan", "nan.safetensors", _with(UP, _poke(float("nan"))), "LoRAFormatError", r"NaN or Inf",
            key=UP),
    Hostile("factor_inf", "inf.safetensors", _with(DOWN, _poke(float("inf"))), "LoRAFormatError", r"NaN or Inf",
            key=DOWN),
    Hostile("factor_minus_inf", "minf.safetensors", _with(f"{STEM2}.lora_up.weight", _poke(float("-inf"))),
            "LoRAFormatError", r"NaN or Inf", key=f"{STEM2}.lora_up.weight"),
    Hostile("alpha_nan", "alpha_nan.safetensors", _mutated(**{ALPHA.replace(".", "__"): torch.tensor(float("nan"))}),
            "LoRAFormatError", r"nan.*finite", key=ALPHA),
    Hostile("alpha_inf", "alpha_inf.safetensors", _mutated(**{ALPHA.replace(".", "__"): torch.tensor(float("inf"))}),
            "LoRAFormatError", r"inf.*finite", key=ALPHA),
    Hostile("alpha_zero", "alpha0.safetensors", _mutated(**{ALPHA.replace(".", "__"): torch.tensor(0.0)}),
            "LoRAFormatError", r"must be positive", key=ALPHA),
    Hostile("alpha_negative", "alpha_neg.safetensors", _mutated(**{ALPHA.replace(".", "__"): torch.tensor(-8.0)}),
            "LoRAFormatError", r"-8\.0.*must be positive", key=ALPHA),
    Hostile("alpha_vector", "alpha_vec.safetensors", _mutated(**{ALPHA.replace(".", "__"): torch.ones(3)}),
            "LoRAFormatError", r"single number", key=ALPHA),
    Hostile("alpha_bool", "alpha_bool.safetensors", _mutated(**{ALPHA.replace(".", "__"): torch.tensor(True)}),
            "LoRAFormatError", r"single number", key=ALPHA),
    Hostile("rank_0", "rank0.safetensors",
            _mutated(**{DOWN.replace(".", "__"): torch.zeros(0, TINY.hidden, dtype=torch.bfloat16),
                        UP.replace(".", "__"): torch.zeros(3 * TINY.hidden, 0, dtype=torch.bfloat16)}),
            "LoRAFormatError", r"rank 0", key=DOWN),
    Hostile("ranks_disagree", "ranks.safetensors", _with(DOWN, lambda t: t[: RANK - 1]), "LoRAFormatError",
            r"ranks \(4 vs 3\) disagree", key=DOWN),
    Hostile("up_without_down", "no_down.safetensors", _mutated(**{DOWN.replace(".", "__"): None}),
            "LoRAFormatError", r"no matching down", key=UP),
    Hostile("conv_factors", "conv.safetensors", _conv_factors, "LoRAFormatError", r"convolution", key=DOWN),
    Hostile("loha_shapes_disagree", "loha.safetensors",
            _save({f"{STEM}.hada_w1_a": torch.randn(96, 4), f"{STEM}.hada_w1_b": torch.randn(4, 32),
                   f"{STEM}.hada_w2_a": torch.randn(96, 3), f"{STEM}.hada_w2_b": torch.randn(4, 32)}),
            "LoRAFormatError", r"LoHa factors do not fit", key=f"{STEM}.hada_w2_a"),
    Hostile("lokr_shapes_disagree", "lokr.safetensors",
            _save({f"{STEM}.lokr_w1": torch.randn(4, 4), f"{STEM}.lokr_w2_a": torch.randn(24, 2),
                   f"{STEM}.lokr_w2_b": torch.randn(3, 8)}),
            "LoRAFormatError", r"LoKr factors do not fit", key=f"{STEM}.lokr_w2_a"),
    Hostile("dora_magnitude_shape", "dora.safetensors",
            _mutated(**{f"{STEM}__dora_scale": torch.ones(1, 7)}), "LoRAFormatError", r"magnitude.*\(1, 7\)",
            key=f"{STEM}.dora_scale"),
    # --- metadata that sets the scale, unreadable or absurd -------------------------------------------------
    Hostile("peft_metadata_not_object", "peft_list.safetensors", _peft("[8, 4]"), "LoRAFormatError",
            r"not a JSON object", key="lora_adapter_metadata"),
    Hostile("peft_metadata_not_json", "peft_json.safetensors", _peft("{lora_alpha: 8"), "LoRAFormatError",
            r"not a JSON object", key="lora_adapter_metadata"),
    Hostile("peft_alpha_not_a_number", "peft_str.safetensors", _peft('{"lora_alpha": "eight", "r": 4}'),
            "LoRAFormatError", r"lora_alpha is 'eight'.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_alpha_negative", "peft_neg.safetensors", _peft('{"lora_alpha": -8, "r": 4}'), "LoRAFormatError",
            r"lora_alpha is -8.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_alpha_zero", "peft_zero.safetensors", _peft('{"lora_alpha": 0, "r": 4}'), "LoRAFormatError",
            r"lora_alpha is 0.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_rank_zero", "peft_r0.safetensors", _peft('{"lora_alpha": 8, "r": 0}'), "LoRAFormatError",
            r"\br is 0.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_pattern_nan", "peft_nan.safetensors",
            _peft('{"lora_alpha": 8, "r": 4, "alpha_pattern": {"transformer.transformer_blocks.0.attn.to_q": NaN}}'),
            "LoRAFormatError", r"alpha_pattern.*is nan", key="transformer.transformer_blocks.0.attn.to_q"),
    Hostile("peft_pattern_negative", "peft_pneg.safetensors",
            _peft('{"lora_alpha": 8, "r": 4, "alpha_pattern": {"transformer.transformer_blocks.0.attn.to_k": -3}}'),
            "LoRAFormatError", r"alpha_pattern.*is -3", key="transformer.transformer_blocks.0.attn.to_k"),
    # --- one target, two naming schemes ---------------------------------------------------------------------
    Hostile("two_schemes_prefix", "two_prefix.safetensors", _two_schemes_prefix, "LoRAFormatError",
            r"two naming schemes", key=f"diffusion_model.{MODULE}.lora_down.weight"),
    Hostile("two_schemes_suffix", "two_suffix.safetensors", _two_schemes_suffix, "LoRAFormatError",
            r"two naming schemes", key=f"{STEM}.lora_A.weight"),
    Hostile("two_schemes_split_rows", "two_split.safetensors", _two_schemes_split, "LoRAFormatError",
            r"two naming schemes", key="transformer.transformer_blocks.0.attn.to_k.lora_A.weight"),
    # --- not a Flux LoRA ------------------------------------------------------------------------------------
    Hostile("sdxl_lora", "sdxl.safetensors", _factory("sdxl"), "LoRAFormatError", r"SD 1\.x / SDXL"),
    Hostile("sd3_lora", "sd3.safetensors", _sd3_kohya, "LoRAFormatError", r"SD3"),
    Hostile("text_encoder_only", "te.safetensors", _text_encoder_only, "LoRAFormatError", r"text-encoder-only"),
    Hostile("no_tensors", "none.safetensors", lambda p: raw_file(p, b"{}"), "LoRAFormatError",
            r"nothing in this file applies to Flux"),
    Hostile("unknown_keys", "unknown.safetensors", _save({"foo.bar": torch.ones(2), "baz": torch.ones(3)}),
            "LoRAFormatError", r"nothing in this file applies to Flux"),
    Hostile("flux_model_as_lora", "flux_model.safetensors", write_model, "LoRAFormatError",
            r"model checkpoint.*not a LoRA"),
    # --- a valid LoRA for another model (refused when merged) ----------------------------------------------
    Hostile("other_hidden_size", "h48.safetensors",
            _factory("kohya", FluxShape(hidden=48, depth=2, depth_single=2, heads=2, context_dim=48, vec_dim=24,
                                        time_dim=16, in_channels=16, out_channels=16)),
            "ModelMismatchError", r"another size", key=lambda p: "lora_unet_", stage="fit"),
    Hostile("control_wide_img_in", "wide.safetensors", _factory("bfl_control_wide_img_in"), "ModelMismatchError",
            r"Canny/Depth", key="img_in.lora_A.weight", stage="fit"),
    Hostile("deeper_than_model", "deep_blocks.safetensors", _deeper_lora, "ModelMismatchError", r"does not have",
            key="lora_unet_double_blocks_5_img_attn_qkv.lora_down.weight", stage="fit"),
    Hostile("sd3_diffusers_names", "sd3_diffusers.safetensors", _sd3_diffusers, "ModelMismatchError",
            r"another size", key="transformer.transformer_blocks.0.attn.", stage="fit"),
    # --- bad model files (offline merge) -------------------------------------------------------------------
    Hostile("model_not_flux", "sdxl_unet.safetensors", _not_flux_model, "ModelMismatchError",
            r"not a Flux checkpoint", stage="model"),
    Hostile("model_is_a_lora", "model_lora.safetensors", write_valid_lora, "ModelMismatchError",
            r"not a Flux checkpoint", stage="model"),
    Hostile("model_truncated", "model_cut.safetensors", _truncated_model, "UnsafeFileError", r"runs past the end",
            key=_last_tensor_key, stage="model"),
    Hostile("model_pickle", "model.ckpt", _torch_save(True), "UnsafeFileError", PICKLE,
            stage="model"),
    Hostile("model_empty", "model_empty.safetensors", lambda p: (p.write_bytes(b""), p)[1], "UnsafeFileError",
            r"0 bytes", stage="model"),
)

BY_NAME = {h.name: h for h in HOSTILE}
assert len(BY_NAME) == len(HOSTILE), "duplicate case names"


def cases(*stages: str) -> list[Hostile]:
    return [h for h in HOSTILE if h.stage in stages]
