"""How faithfully do LoRAs survive a merge into fp8? Our scaled fp8 vs kohya's cast vs ComfyUI's rounding (CPU).

    PYTHONPATH=. python bench/fp8_fidelity.py [--layers qkv,mlp] [--rank 32]
    COMFYUI_ROOT=../shared/comfyui/0.3.64 COMFYUI_PYTHON=<venv>/bin/python PYTHONPATH=. python bench/fp8_fidelity.py

Real-width Flux weights (one double-block img_attn.qkv 9216x3072 and one img_mlp.0 12288x3072 from
lora_ops.synthetic, bf16) and a rank-32 LoRA whose change is 1 %, 3 % and 10 % of the weight's norm.
W_ref = the fp32 merge (bf16 weight + ΔW in fp32). Error = ‖W_fp8_merged_dequantised − W_ref‖ / ‖ΔW‖.

Table 1, merge-then-quantise (bf16 model + LoRA → fp8):
  floor     our scaling applied to W_ref itself (round to nearest): the best one rounding can do
  (a)       ours: quantize_merged, fresh per-tensor power-of-two scale, round to nearest
  (a) SR    ours with seeded stochastic rounding
  (a) exact ours with scale = amax/448 exactly (not a power of two)
  (b)       kohya: the bf16 merge cast to float8_e4m3fn (no scale)
  (c)       ComfyUI's method, reimplemented: value.half(), then stochastic rounding into unscaled e4m3fn with a
            per-key torch.Generator (row slices of ~4096² elements, clamp to ±448)
Table 2, a LoRA into a model that is already fp8 (reference still W_ref, so base quantisation counts):
  ours      our scaled fp8 model + LoRA, fresh scale, nearest (merge_loras_fp8 / the in-place codec)
  legacy    ComfyUI 0.3.64 scaled fp8: dequantise, add, divide by the OLD scale, half(), stochastic round
  plain     ComfyUI fp8_e4m3fn UNETLoader (plain cast at load) + LoraLoader (fp32 add, half(), stochastic round)
With COMFYUI_ROOT set, ComfyUI's own comfy.float.stochastic_rounding is measured too (column (c) comfy), and a
real-width 1+1-block Flux is written with our scaled fp8 and loaded by ComfyUI (dtypes, exactness of its
dequantisation, what happens to layers we keep bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

from lora_ops import GIB, fp8
from lora_ops.adapters import LoRA
from lora_ops.flux import FLUX_DEV, FluxShape
from lora_ops.formats import Coverage, LoRAFile
from lora_ops.synthetic import flux_state_dict

E4M3 = torch.float8_e4m3fn
LAYERS = {"qkv": "double_blocks.0.img_attn.qkv.weight", "mlp": "double_blocks.0.img_mlp.0.weight"}
CHANGES = (0.01, 0.03, 0.10)


def rel(x: torch.Tensor, ref: torch.Tensor, dw_norm: float) -> float:
    return float((x.double() - ref.double()).norm()) / dw_norm


def make_lora(weight: torch.Tensor, rank: int, change: float, seed: int) -> tuple[LoRA, torch.Tensor]:
    """A bf16 rank-`rank` LoRA whose ΔW has norm `change`·‖W‖; returns it and ΔW (fp32)."""
    out_f, in_f = weight.shape
    gen = torch.Generator().manual_seed(seed)
    down = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(torch.bfloat16)
    up = (torch.randn(out_f, rank, generator=gen) * 0.01).to(torch.bfloat16)
    raw = up.float() @ down.float()
    scale = change * float(weight.float().norm()) / float(raw.norm())
    lora = LoRA(up, down, source_keys=("bench.lora_up.weight",), scale=scale)
    dw = torch.zeros(weight.shape)
    lora.on("cpu").add_delta(dw, 0, out_f, 1.0)
    return lora, dw


def comfy_like_sr(x: torch.Tensor, key: str, scale: float = 1.0) -> torch.Tensor:
    """ComfyUI's described algorithm, our code: x/scale → half → stochastic round to e4m3fn, per-key generator."""
    v = (x / scale).half().float()
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    rows = max(1, (4096 * 4096) // v.shape[1])
    out = torch.empty(v.shape, dtype=E4M3)
    for r0 in range(0, v.shape[0], rows):
        piece = v[r0 : r0 + rows]
        out[r0 : r0 + rows] = fp8.stochastic_fp8(piece, torch.rand(piece.shape, generator=gen))
    return out


def measure(weights: dict[str, torch.Tensor], rank: int, comfy: bool, workdir: Path) -> list[dict]:
    rows = []
    for short, w in weights.items():
        for i, change in enumerate(CHANGES):
            lora, dw = make_lora(w, rank, change, seed=100 + i)
            ref = w.float() + dw
            dwn = float(dw.double().norm())
            r: dict[str, object] = {"layer": f"{short} {tuple(w.shape)[0]}x{tuple(w.shape)[1]}", "change": change}
            q, s = fp8.quantize(ref)
            r["floor"] = rel(fp8.dequantize(q, s), ref, dwn)
            t0 = time.perf_counter()
            q, s = fp8.quantize_merged(w, [(lora, 1.0)], key=LAYERS[short])
            r["time_a"] = time.perf_counter() - t0
            r["a"] = rel(fp8.dequantize(q, s), ref, dwn)
            q, s = fp8.quantize_merged(w, [(lora, 1.0)], key=LAYERS[short], rounding="stochastic", seed=0)
            r["a_sr"] = rel(fp8.dequantize(q, s), ref, dwn)
            q, s = fp8.quantize_merged(w, [(lora, 1.0)], key=LAYERS[short], scale_mode="exact")
            r["a_exact"] = rel(fp8.dequantize(q, s), ref, dwn)
            r["b"] = rel((w.float() + dw).to(torch.bfloat16).to(E4M3).float(), ref, dwn)
            r["c"] = rel(comfy_like_sr(ref, LAYERS[short]).float(), ref, dwn)
            # --- table 2: into a model that is already fp8
            q0, s0 = fp8.quantize(w)
            key = LAYERS[short]
            sd = {key: q0.clone(), key.replace(".weight", ".scale_weight"): s0.clone()}
            lora_file = LoRAFile(Path("bench.safetensors"), "kohya", {key: [lora]}, Coverage())
            t0 = time.perf_counter()
            state = fp8.merge_loras_fp8(sd, [(lora_file, 1.0)])  # in place, engine + exact-undo journal
            r["time_inplace"] = time.perf_counter() - t0
            r["fp8_ours"] = rel(fp8.dequantize(sd[key], sd[key.replace(".weight", ".scale_weight")]), ref, dwn)
            r["journal"] = state.journal_bytes / q0.numel()
            fp8.merge_loras_fp8(sd, [], state=state)
            r["undo_exact"] = bool(torch.equal(sd[key].view(torch.uint8), q0.view(torch.uint8)))
            merged = fp8.dequantize(q0, s0) + dw
            r["fp8_legacy"] = rel(comfy_like_sr(merged, LAYERS[short], float(s0)).float() * s0, ref, dwn)
            plain = w.to(E4M3).float() + dw
            r["fp8_plain"] = rel(comfy_like_sr(plain, LAYERS[short]).float(), ref, dwn)
            if comfy:
                path = workdir / f"{short}_{i}.pt"
                torch.save({"ref": ref, "dw_norm": dwn, "key": LAYERS[short]}, path)
                r["c_comfy"] = comfy_probe(["sr", str(path)])["error"]
            rows.append(r)
            print(".", end="", flush=True)
    print()
    return rows


def print_tables(rows: list[dict], comfy: bool) -> None:
    print("\nTable 1. merge-then-quantise, error = ‖W_fp8 − W_ref‖/‖ΔW‖ (lower is better)")
    head = f"{'layer':<18}{'ΔW/W':>6}{'floor':>8}{'(a)':>8}{'(a)SR':>8}{'(a)ex':>8}{'(b)':>8}{'(c)':>8}"
    head += f"{'(c)comfy':>10}" if comfy else ""
    head += f"{'(a)/(c)':>9}{'t(a) s':>8}"
    print(head)
    for r in rows:
        line = (f"{r['layer']:<18}{r['change']:>6.0%}{r['floor']:>8.3f}{r['a']:>8.3f}{r['a_sr']:>8.3f}"
                f"{r['a_exact']:>8.3f}{r['b']:>8.3f}{r['c']:>8.3f}")
        line += f"{r['c_comfy']:>10.3f}" if comfy else ""
        line += f"{r['a'] / r['c']:>9.3f}{r['time_a']:>8.2f}"
        print(line)
    worst = max(r["a"] / r["c"] for r in rows)
    print(f"worst (a)/(c) = {worst:.3f}  (target <= 0.45: {'met' if worst <= 0.45 else 'NOT met'})")
    print("\nTable 2. LoRA into an fp8 model (reference: the fp32 merge of the bf16 model)")
    print(f"{'layer':<18}{'ΔW/W':>6}{'ours':>8}{'legacy':>8}{'plain':>8}   in-place: journal/fp8 bytes, undo, time")
    for r in rows:
        print(f"{r['layer']:<18}{r['change']:>6.0%}{r['fp8_ours']:>8.3f}{r['fp8_legacy']:>8.3f}{r['fp8_plain']:>8.3f}"
              f"   {r['journal']:>6.1%}  {'exact' if r['undo_exact'] else 'NOT EXACT'}  {r['time_inplace']:.1f} s")


def print_sizes() -> None:
    print("\nFile sizes (tensor bytes; header not included)")
    small = FluxShape(depth=1, depth_single=1)
    s = fp8.policy_size(small, "default")
    print(f"FluxShape(depth=1, depth_single=1), default policy: {s.total / 1e9:.3f} GB vs bf16 "
          f"{s.bf16_bytes / 1e9:.3f} GB = {s.ratio:.3f}x (target <= 0.6: {'met' if s.ratio <= 0.6 else 'NOT met'})")
    print(f"Flux-dev (19+38 blocks), bf16 {2 * sum(math.prod(d) for d in _shapes(FLUX_DEV)) / 1e9:.2f} GB:")
    for name, size in fp8.preset_sizes(FLUX_DEV).items():
        print(f"  {name:<8} {size.total / 1e9:7.2f} GB ({size.total / GIB:6.2f} GiB) = {size.ratio:.3f}x bf16; "
              f"{size.fp8_tensors} fp8 tensors, {size.fp8_bytes / 1e9:.2f} GB fp8 + {size.other_bytes / 1e9:.2f} GB "
              "bf16")


def _shapes(shape):
    from lora_ops.flux import flux_weight_shapes

    return flux_weight_shapes(shape).values()


# ------------------------------------------------------------------------------------------- ComfyUI itself


def comfy_probe(args: list[str]) -> dict:
    root = os.environ["COMFYUI_ROOT"]
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--comfy-probe", *args], cwd=root,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"ComfyUI probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _comfy_import():
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, os.getcwd())
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.float
    import comfy.sd

    return comfy


def _held_weight(module) -> tuple[torch.Tensor, float]:
    """(dequantised weight, scale) as ComfyUI holds a Linear: a QuantizedTensor (0.33+: comfy_quant, and scaled_fp8
    files translated on load) or an fp8 weight with `scale_weight` (0.3.x scaled-fp8 ops)."""
    w = module.weight
    if hasattr(w, "_qdata"):
        return w.dequantize().float(), float(w._params.scale)
    scale = getattr(module, "scale_weight", None)
    if scale is None:
        return w.float(), 1.0
    return (w.to(torch.bfloat16) * scale.to(torch.bfloat16)).float(), float(scale)


def probe_main(args: list[str]) -> None:
    """Runs inside ComfyUI's Python (cwd = COMFYUI_ROOT); prints one JSON line."""
    import logging

    logging.disable(logging.WARNING)
    comfy = _comfy_import()
    if args[0] == "sr":
        data = torch.load(args[1])
        out = comfy.float.stochastic_rounding(data["ref"].clone(), E4M3, seed=zlib.crc32(data["key"].encode()))
        err = float((out.float().double() - data["ref"].double()).norm()) / data["dw_norm"]
        print(json.dumps({"error": err}))
        return
    if args[0] == "load":
        path, ours_path = args[1], args[2]
        patcher = comfy.sd.load_diffusion_model(path)
        model = patcher.model.diffusion_model
        from safetensors.torch import load_file

        ours = load_file(ours_path)
        bf16_src = load_file(args[3]) if len(args) > 3 else {}
        result: dict[str, object] = {"ops": type(model.img_in).__qualname__}
        for name in ("double_blocks.0.img_attn.qkv", "img_in", "final_layer.linear", "double_blocks.0.img_mod.lin"):
            m = model.get_submodule(name)
            comfy_w, scale = _held_weight(m)
            if ours[name + ".weight"].dtype == E4M3:
                file_scale = ours.get(name + ".scale_weight", ours.get(name + ".weight_scale"))
                mine = (ours[name + ".weight"].float() * file_scale).to(torch.bfloat16).float()
            else:
                mine = ours[name + ".weight"].float()
            entry = {"weight_dtype": str(m.weight.dtype), "bias_dtype": str(m.bias.dtype),
                     "scale": scale, "max_abs_diff_vs_file": float((comfy_w - mine).abs().max()),
                     "rel_err_vs_file": float((comfy_w - mine).norm() / mine.norm())}
            if bf16_src:
                b = bf16_src[name + ".bias"].float()
                entry["bias_rel_err_vs_bf16"] = float((m.bias.float() - b).norm() / b.norm())
                src_w = bf16_src[name + ".weight"].float()
                entry["weight_rel_err_vs_bf16"] = float((comfy_w - src_w).norm() / src_w.norm())
            x = torch.randn(4, m.in_features, dtype=torch.bfloat16)
            y = m(x).float()
            y_ref = torch.nn.functional.linear(x.float(), mine, ours[name + ".bias"].float())
            entry["forward_rel_err"] = float((y - y_ref).norm() / y_ref.norm())
            result[name] = entry
        print(json.dumps(result))
        return
    raise SystemExit(f"unknown probe {args[0]}")


def comfy_load_section(workdir: Path) -> None:
    from lora_ops.synthetic import write_flux_checkpoint

    print("\nComfyUI (COMFYUI_ROOT) loading our scaled-fp8 files (real width, 1 double + 1 single block, CPU)")
    src = write_flux_checkpoint(workdir / "flux_d1s1.safetensors", FluxShape(depth=1, depth_single=1), seed=0)
    for policy in ("default", "all"):
        out = workdir / f"flux_d1s1_fp8_{policy}.safetensors"
        fp8.merge_checkpoint_fp8(src, [], out, policy=policy, file_format="scaled_fp8")
        res = comfy_probe(["load", str(out), str(out), str(src)])
        print(f"policy {policy}: ComfyUI ops {res.pop('ops')}")
        for name, e in res.items():
            print(f"  {name:<30} weight {e['weight_dtype']:<20} bias {e['bias_dtype']:<20} "
                  f"|Δ| vs file {e['max_abs_diff_vs_file']:.2e} (rel {e['rel_err_vs_file']:.2e}), weight rel err vs "
                  f"bf16 source {e.get('weight_rel_err_vs_bf16', float('nan')):.2e}, "
                  f"bias rel err {e.get('bias_rel_err_vs_bf16', float('nan')):.2e}, forward rel err "
                  f"{e['forward_rel_err']:.2e}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--comfy-probe":
        probe_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="qkv,mlp")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    comfy = bool(os.environ.get("COMFYUI_ROOT"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; ComfyUI: {os.environ.get('COMFYUI_ROOT') or 'not measured'}")
    t0 = time.perf_counter()
    sd = flux_state_dict(FluxShape(depth=1, depth_single=0), seed=0)
    weights = {short: sd[LAYERS[short]] for short in args.layers.split(",")}
    del sd
    print(f"synthetic weights: {', '.join(f'{k} {tuple(v.shape)}' for k, v in weights.items())} "
          f"({time.perf_counter() - t0:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(weights, args.rank, comfy, Path(tmp))
        print_tables(rows, comfy)
        print_sizes()
        if comfy:
            comfy_load_section(Path(tmp))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
