"""The hostile-file cases: broken safetensors, pickles, broken or foreign LoRAs, models that are not Flux.

Each `Hostile` case writes one file into a directory and says how it must be refused:

* stage "load": `load_lora` refuses it (`UnsafeFileError` for a broken file, `LoRAFormatError` for a broken
  or foreign LoRA), so `inspect` and `merge` refuse it too;
* stage "fit": the file is a well-formed LoRA, but not for this model: `merge_loras` /
  `offline.merge_checkpoint` refuse it (`ModelMismatchError`) before any weight changes;
* stage "model": the file is given as the *model* of an offline merge.

`key` is the tensor key the message must name (None where the problem is not one key) and `words` a regex
for the problem.

The files themselves are written by hostile_bytes.py (byte-level damage, pickles) and hostile_loras.py (valid
LoRAs and models, and LoRAs broken or foreign at the tensor level).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hostile_bytes import (
    PICKLE,
    cut,
    f32,
    last_tensor_key,
    pickled,
    raw_file,
    sparse_huge_header,
    torch_saved,
    truncated_model,
    two_tensors,
)
from hostile_loras import (
    ALPHA,
    DOWN,
    MODULE,
    RANK,
    STEM,
    STEM2,
    UP,
    conv_factors,
    deeper_lora,
    from_factory,
    mutated,
    not_flux_model,
    peft,
    poked,
    replaced,
    saved,
    sd3_diffusers,
    sd3_kohya,
    text_encoder_only,
    two_schemes_prefix,
    two_schemes_split,
    two_schemes_suffix,
    write_model,
    write_valid_lora,
)
from lora_factory import TINY

from lora_ops.flux import FluxShape


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


HOSTILE: tuple[Hostile, ...] = (
    # --- the file is not well-formed safetensors ------------------------------------------------------------
    Hostile("empty", "empty.safetensors", lambda p: (p.write_bytes(b""), p)[1], "UnsafeFileError", r"0 bytes"),
    Hostile("five_bytes", "short.safetensors", lambda p: (p.write_bytes(b"\x10\0\0\0\0"), p)[1],
            "UnsafeFileError", r"5 bytes"),
    Hostile("truncated_in_header", "cut_header.safetensors", cut(0.5, "header"), "UnsafeFileError",
            r"runs past the end"),
    Hostile("truncated_in_data", "cut_data.safetensors", cut(10, "data"), "UnsafeFileError",
            r"runs past the end", key=last_tensor_key),
    Hostile("header_len_past_eof", "past_eof.safetensors",
            lambda p: raw_file(p, f32("a", [2], 0), b"\0" * 8, header_len=4096), "UnsafeFileError",
            r"runs past the end"),
    Hostile("header_claims_512MB", "huge_header.safetensors",
            lambda p: raw_file(p, b"{}", header_len=512 * 2**20), "UnsafeFileError", r"claim.*limit"),
    Hostile("header_claims_300MB_sparse", "huge_sparse.safetensors", sparse_huge_header, "UnsafeFileError",
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
    Hostile("offsets_overlap", "overlap.safetensors", lambda p: two_tensors(p, [0, 8], [4, 12]),
            "UnsafeFileError", r"overlap", key="b"),
    Hostile("offsets_out_of_range", "range.safetensors", lambda p: two_tensors(p, [0, 8], [8, 16], data_len=12),
            "UnsafeFileError", r"runs past the end", key="b"),
    Hostile("offsets_huge", "huge_off.safetensors",
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [2**62, 2**62 + 8]}},
                               b"\0" * 8), "UnsafeFileError", r"runs past the end", key="w"),
    Hostile("offsets_reversed", "reversed.safetensors", lambda p: two_tensors(p, [8, 0], [8, 16]),
            "UnsafeFileError", r"invalid data_offsets", key="a"),
    Hostile("offsets_size_mismatch", "size.safetensors",
            lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "UnsafeFileError", r"bytes stored for shape", key="w"),
    Hostile("offsets_gap", "gap.safetensors", lambda p: two_tensors(p, [0, 8], [12, 20], data_len=20),
            "UnsafeFileError", r"gap", key="b"),
    Hostile("trailing_bytes", "trailing.safetensors", lambda p: two_tensors(p, [0, 8], [8, 16], data_len=24),
            "UnsafeFileError", r"belong to no tensor", key="b"),
    Hostile("metadata_not_strings", "meta.safetensors",
            lambda p: raw_file(p, {"__metadata__": {"rank": 4}, **f32("w", [2], 0)}, b"\0" * 8),
            "UnsafeFileError", r"__metadata__"),
    # --- pickles: never unpickled ---------------------------------------------------------------------------
    Hostile("pickle_pt_zip", "lora.pt", torch_saved(True), "UnsafeFileError", PICKLE),
    Hostile("pickle_ckpt_legacy", "lora.ckpt", torch_saved(False), "UnsafeFileError",
            PICKLE),
    Hostile("pickle_zip_renamed", "zip_renamed.safetensors", torch_saved(True), "UnsafeFileError",
            PICKLE),
    Hostile("pickle_p2_renamed", "p2.safetensors", pickled(2), "UnsafeFileError", PICKLE),
    Hostile("pickle_p5_renamed", "p5.safetensors", pickled(5), "UnsafeFileError", PICKLE),
    Hostile("pickle_p0_renamed", "p0.safetensors", pickled(0), "UnsafeFileError", PICKLE),
    # --- broken LoRA factors ----------------------------------------------------------------------------------
    Hostile("factor_bool", "bool.safetensors", replaced(UP, lambda t: t > 0), "LoRAFormatError", r"torch\.bool",
            key=UP),
    Hostile("factor_int32", "int32.safetensors", replaced(DOWN, lambda t: (t * 100).to(torch.int32)),
            "LoRAFormatError", r"torch\.int32", key=DOWN),
    Hostile("factor_int8", "int8.safetensors", replaced(UP, lambda t: (t * 100).to(torch.int8)), "LoRAFormatError",
            r"torch\.int8", key=UP),
    Hostile("factor_fp8", "fp8.safetensors", replaced(DOWN, lambda t: t.to(torch.float8_e4m3fn)), "LoRAFormatError",
            r"float8_e4m3fn", key=DOWN),
    Hostile("factor_nan", "nan.safetensors", replaced(UP, poked(float("nan"))), "LoRAFormatError", r"NaN or Inf",
            key=UP),
    Hostile("factor_inf", "inf.safetensors", replaced(DOWN, poked(float("inf"))), "LoRAFormatError", r"NaN or Inf",
            key=DOWN),
    Hostile("factor_minus_inf", "minf.safetensors", replaced(f"{STEM2}.lora_up.weight", poked(float("-inf"))),
            "LoRAFormatError", r"NaN or Inf", key=f"{STEM2}.lora_up.weight"),
    Hostile("alpha_nan", "alpha_nan.safetensors", mutated(**{ALPHA.replace(".", "__"): torch.tensor(float("nan"))}),
            "LoRAFormatError", r"nan.*finite", key=ALPHA),
    Hostile("alpha_inf", "alpha_inf.safetensors", mutated(**{ALPHA.replace(".", "__"): torch.tensor(float("inf"))}),
            "LoRAFormatError", r"inf.*finite", key=ALPHA),
    Hostile("alpha_zero", "alpha0.safetensors", mutated(**{ALPHA.replace(".", "__"): torch.tensor(0.0)}),
            "LoRAFormatError", r"must be positive", key=ALPHA),
    Hostile("alpha_negative", "alpha_neg.safetensors", mutated(**{ALPHA.replace(".", "__"): torch.tensor(-8.0)}),
            "LoRAFormatError", r"-8\.0.*must be positive", key=ALPHA),
    Hostile("alpha_vector", "alpha_vec.safetensors", mutated(**{ALPHA.replace(".", "__"): torch.ones(3)}),
            "LoRAFormatError", r"single number", key=ALPHA),
    Hostile("alpha_bool", "alpha_bool.safetensors", mutated(**{ALPHA.replace(".", "__"): torch.tensor(True)}),
            "LoRAFormatError", r"single number", key=ALPHA),
    Hostile("rank_0", "rank0.safetensors",
            mutated(**{DOWN.replace(".", "__"): torch.zeros(0, TINY.hidden, dtype=torch.bfloat16),
                        UP.replace(".", "__"): torch.zeros(3 * TINY.hidden, 0, dtype=torch.bfloat16)}),
            "LoRAFormatError", r"rank 0", key=DOWN),
    Hostile("ranks_disagree", "ranks.safetensors", replaced(DOWN, lambda t: t[: RANK - 1]), "LoRAFormatError",
            r"ranks \(4 vs 3\) disagree", key=DOWN),
    Hostile("up_without_down", "no_down.safetensors", mutated(**{DOWN.replace(".", "__"): None}),
            "LoRAFormatError", r"no matching down", key=UP),
    Hostile("conv_factors", "conv.safetensors", conv_factors, "LoRAFormatError", r"convolution", key=DOWN),
    Hostile("loha_shapes_disagree", "loha.safetensors",
            saved({f"{STEM}.hada_w1_a": torch.randn(96, 4), f"{STEM}.hada_w1_b": torch.randn(4, 32),
                   f"{STEM}.hada_w2_a": torch.randn(96, 3), f"{STEM}.hada_w2_b": torch.randn(4, 32)}),
            "LoRAFormatError", r"LoHa factors do not fit", key=f"{STEM}.hada_w2_a"),
    Hostile("lokr_shapes_disagree", "lokr.safetensors",
            saved({f"{STEM}.lokr_w1": torch.randn(4, 4), f"{STEM}.lokr_w2_a": torch.randn(24, 2),
                   f"{STEM}.lokr_w2_b": torch.randn(3, 8)}),
            "LoRAFormatError", r"LoKr factors do not fit", key=f"{STEM}.lokr_w2_a"),
    Hostile("dora_magnitude_shape", "dora.safetensors",
            mutated(**{f"{STEM}__dora_scale": torch.ones(1, 7)}), "LoRAFormatError", r"magnitude.*\(1, 7\)",
            key=f"{STEM}.dora_scale"),
    # --- metadata that sets the scale, unreadable or absurd -------------------------------------------------
    Hostile("peft_metadata_not_object", "peft_list.safetensors", peft("[8, 4]"), "LoRAFormatError",
            r"not a JSON object", key="lora_adapter_metadata"),
    Hostile("peft_metadata_not_json", "peft_json.safetensors", peft("{lora_alpha: 8"), "LoRAFormatError",
            r"not a JSON object", key="lora_adapter_metadata"),
    Hostile("peft_alpha_not_a_number", "peft_str.safetensors", peft('{"lora_alpha": "eight", "r": 4}'),
            "LoRAFormatError", r"lora_alpha is 'eight'.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_alpha_negative", "peft_neg.safetensors", peft('{"lora_alpha": -8, "r": 4}'), "LoRAFormatError",
            r"lora_alpha is -8.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_alpha_zero", "peft_zero.safetensors", peft('{"lora_alpha": 0, "r": 4}'), "LoRAFormatError",
            r"lora_alpha is 0.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_rank_zero", "peft_r0.safetensors", peft('{"lora_alpha": 8, "r": 0}'), "LoRAFormatError",
            r"\br is 0.*positive number", key="lora_adapter_metadata"),
    Hostile("peft_pattern_nan", "peft_nan.safetensors",
            peft('{"lora_alpha": 8, "r": 4, "alpha_pattern": {"transformer.transformer_blocks.0.attn.to_q": NaN}}'),
            "LoRAFormatError", r"alpha_pattern.*is nan", key="transformer.transformer_blocks.0.attn.to_q"),
    Hostile("peft_pattern_negative", "peft_pneg.safetensors",
            peft('{"lora_alpha": 8, "r": 4, "alpha_pattern": {"transformer.transformer_blocks.0.attn.to_k": -3}}'),
            "LoRAFormatError", r"alpha_pattern.*is -3", key="transformer.transformer_blocks.0.attn.to_k"),
    # --- one target, two naming schemes ---------------------------------------------------------------------
    Hostile("two_schemes_prefix", "two_prefix.safetensors", two_schemes_prefix, "LoRAFormatError",
            r"two naming schemes", key=f"diffusion_model.{MODULE}.lora_down.weight"),
    Hostile("two_schemes_suffix", "two_suffix.safetensors", two_schemes_suffix, "LoRAFormatError",
            r"two naming schemes", key=f"{STEM}.lora_A.weight"),
    Hostile("two_schemes_split_rows", "two_split.safetensors", two_schemes_split, "LoRAFormatError",
            r"two naming schemes", key="transformer.transformer_blocks.0.attn.to_k.lora_A.weight"),
    # --- not a Flux LoRA ------------------------------------------------------------------------------------
    Hostile("sdxl_lora", "sdxl.safetensors", from_factory("sdxl"), "LoRAFormatError", r"SD 1\.x / SDXL"),
    Hostile("sd3_lora", "sd3.safetensors", sd3_kohya, "LoRAFormatError", r"SD3"),
    Hostile("text_encoder_only", "te.safetensors", text_encoder_only, "LoRAFormatError", r"text-encoder-only"),
    Hostile("no_tensors", "none.safetensors", lambda p: raw_file(p, b"{}"), "LoRAFormatError",
            r"nothing in this file applies to Flux"),
    Hostile("unknown_keys", "unknown.safetensors", saved({"foo.bar": torch.ones(2), "baz": torch.ones(3)}),
            "LoRAFormatError", r"nothing in this file applies to Flux"),
    Hostile("flux_model_as_lora", "flux_model.safetensors", write_model, "LoRAFormatError",
            r"model checkpoint.*not a LoRA"),
    # --- a valid LoRA for another model (refused when merged) ----------------------------------------------
    Hostile("other_hidden_size", "h48.safetensors",
            from_factory("kohya", FluxShape(hidden=48, depth=2, depth_single=2, heads=2, context_dim=48, vec_dim=24,
                                        time_dim=16, in_channels=16, out_channels=16)),
            "ModelMismatchError", r"another size", key=lambda p: "lora_unet_", stage="fit"),
    Hostile("control_wide_img_in", "wide.safetensors", from_factory("bfl_control_wide_img_in"), "ModelMismatchError",
            r"Canny/Depth", key="img_in.lora_A.weight", stage="fit"),
    Hostile("deeper_than_model", "deep_blocks.safetensors", deeper_lora, "ModelMismatchError", r"does not have",
            key="lora_unet_double_blocks_5_img_attn_qkv.lora_down.weight", stage="fit"),
    Hostile("sd3_diffusers_names", "sd3_diffusers.safetensors", sd3_diffusers, "ModelMismatchError",
            r"another size", key="transformer.transformer_blocks.0.attn.", stage="fit"),
    # --- bad model files (offline merge) -------------------------------------------------------------------
    Hostile("model_not_flux", "sdxl_unet.safetensors", not_flux_model, "ModelMismatchError",
            r"not a Flux checkpoint", stage="model"),
    Hostile("model_is_a_lora", "model_lora.safetensors", write_valid_lora, "ModelMismatchError",
            r"not a Flux checkpoint", stage="model"),
    Hostile("model_truncated", "model_cut.safetensors", truncated_model, "UnsafeFileError", r"runs past the end",
            key=last_tensor_key, stage="model"),
    Hostile("model_pickle", "model.ckpt", torch_saved(True), "UnsafeFileError", PICKLE,
            stage="model"),
    Hostile("model_empty", "model_empty.safetensors", lambda p: (p.write_bytes(b""), p)[1], "UnsafeFileError",
            r"0 bytes", stage="model"),
)


BY_NAME = {h.name: h for h in HOSTILE}
assert len(BY_NAME) == len(HOSTILE), "duplicate case names"


def cases(*stages: str) -> list[Hostile]:
    return [h for h in HOSTILE if h.stage in stages]
