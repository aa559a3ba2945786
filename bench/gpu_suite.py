"""GPU suite: merge speed and memory on a full-size Flux-dev-shaped model, peak VRAM of a Flux forward,
and the planner's predictions against each measurement. One script, written to run first time.

    PYTHONPATH=. python bench/gpu_suite.py --out "$OUT"           # H100/H200: full size, < 8 minutes
    PYTHONPATH=. python bench/gpu_suite.py --tiny --device cpu    # the same code paths on a tiny shape

Sections (each one is guarded: a failure is recorded and the suite goes on; results are written after
every section, so a timeout still leaves what was measured):

1. weights: a Flux-dev-shaped model (19 double + 38 single blocks, 11.9 B params, bf16 random values)
   created directly on the device as a dict of tensors; kohya LoRAs of rank 32 and 128 built with
   lora_ops.synthetic.kohya_lora_tensors, written to a temp file and read back with lora_ops.load_lora.
2. merge: lora_ops.merge_loras in place on the device (exact undo on and off), median of `--repeats`;
   the memory-traffic floor = W.copy_ of every merged weight (read + write) timed in the same run; extra
   VRAM = torch.cuda.max_memory_allocated during the call minus the memory allocated before it. Restore
   after each merge (bit-exactness checked on sample weights). fp8: lora_ops.fp8 cast (merge_to_fp8)
   and merge into scaled fp8 in place (merge_loras_fp8), when that module provides them.
3. forward: a minimal Flux forward written here (the BFL reference structure: double and single blocks,
   RMSNorm q/k, fp32 RoPE, torch.nn.functional.scaled_dot_product_attention), 1024x1024, batch 1 (and
   batch 2 = CFG, and 512x512), with no LoRA, with the LoRA merged, and unmerged as kohya's
   flux_minimal_inference runs it (fp32 factors with requires_grad inside autocast, whose bf16 cache
   stays for the whole run). Peak VRAM above the weights (+ resident LoRA); merged must equal no-LoRA
   within 1 %.
4. planner: lora_ops.planner's prediction for each measurement (weights, resident LoRA, activations,
   total, merge temporaries); target within 10 %.

On the CPU (`--device cpu`) memory is the peak of live tensor bytes from torch.profiler's memory events
instead of torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from flux_forward import Flux, Runtime, make_inputs, unmerged_runtime

from lora_ops.units import GIB, MIB

# ---------------------------------------------------------------------------------------------
# Memory and time on either device
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Peak:
    """Peak bytes allocated during the block above what was allocated at its start.

    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of torch.profiler memory events.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.extra = 0
        self.seconds = 0.0

    def __enter__(self) -> Peak:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.device.type == "cuda":
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.start
            self.end = torch.cuda.memory_allocated(self.device) - self.start
        else:
            self._prof.__exit__(*exc)
            events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"
                      and e.device_type() == torch.autograd.DeviceType.CPU]
            events.sort(key=lambda e: e.start_ns())
            cur = peak = 0
            for e in events:
                cur += e.nbytes()
                peak = max(peak, cur)
            self.extra, self.end = peak, cur


def timed(device: torch.device, fn) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Weights and LoRAs
# ---------------------------------------------------------------------------------------------


def make_weights(shape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 Flux weights made directly on `device` (no host copy)."""
    from lora_ops.flux import flux_weight_shapes

    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, dims in flux_weight_shapes(shape).items():
        t = torch.randn(dims, generator=gen, device=device, dtype=torch.bfloat16)
        if name.endswith("_norm.scale"):
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(0.01 if name.endswith(".bias") else 0.02)
        out[name] = t
    return out


def make_lora(shape, rank: int, tmp: Path):
    from safetensors.torch import save_file

    from lora_ops import load_lora
    from lora_ops.synthetic import kohya_lora_tensors

    path = tmp / f"kohya_rank{rank}.safetensors"
    tensors = kohya_lora_tensors(shape, rank, seed=rank)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank)})
    del tensors
    return load_lora(path), path


def merged_bytes(weights, lora) -> int:
    return sum(weights[k].numel() * weights[k].element_size() for k in lora.targets)


def lora_params(lora) -> int:
    return sum(t.numel() for ads in lora.targets.values() for a in ads for t in a.factors().values())


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args) -> None:
        from lora_ops.flux import FLUX_DEV, FluxShape

        self.args = args
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        if args.tiny:
            self.shape = FluxShape(hidden=256, depth=2, depth_single=2, heads=2, context_dim=128, vec_dim=64,
                                   time_dim=64)
        elif args.blocks:
            self.shape = FluxShape(depth=args.blocks, depth_single=args.blocks)
        else:
            self.shape = FLUX_DEV
        size = args.size or (256 if args.tiny else 1024)
        self.width = self.height = size
        self.text_tokens = 64 if args.tiny else 512
        self.out = Path(args.out or os.environ.get("OUT") or "bench_results")
        self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.perf_counter()
        self.results: dict[str, object] = {"sections": {}, "errors": {}}
        self.lines: list[str] = []
        self.tmp = tempfile.TemporaryDirectory()

    # --- bookkeeping --------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def say(self, text: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {text}"
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        (self.out / "gpu_suite.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "gpu_suite.txt").write_text("\n".join(self.lines) + "\n")

    def section(self, name: str, fn, *args) -> object:
        try:
            value = fn(*args)
            self.results["sections"][name] = value
            return value
        except Exception as e:  # noqa: BLE001 - record and go on: one failing section must not lose the others
            self.results["errors"][name] = f"{type(e).__name__}: {e}"
            self.say(f"{name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            self.save()

    # --- sections ------------------------------------------------------------------------------
    def environment(self) -> dict:
        info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                "python": sys.version.split()[0], "device": str(self.device), "tiny": self.tiny,
                "shape": str(self.shape), "host": platform.node(), "cpu_threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update(gpu=props.name, gpu_total_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                        cuda=torch.version.cuda)
            self.say(f"GPU {props.name}, {props.total_memory / GIB:.1f} GiB, CUDA {torch.version.cuda}, "
                     f"torch {torch.__version__}")
        else:
            self.say(f"CPU run (torch {torch.__version__}, {torch.get_num_threads()} threads)")
        return info

    def build(self) -> dict:
        from lora_ops.flux import parameter_count

        before = allocated(self.device)
        t = timed(self.device, lambda: setattr(self, "weights", make_weights(self.shape, self.device)))
        nbytes = sum(v.numel() * v.element_size() for v in self.weights.values())
        measured = allocated(self.device) - before
        self.say(f"weights: {parameter_count(self.shape):,} params, {nbytes / GIB:.2f} GiB bf16 made on "
                 f"{self.device} in {t:.1f} s (allocator: {measured / GIB:.2f} GiB)")
        self.loras = {}
        out = {"params": parameter_count(self.shape), "bytes": nbytes, "allocated_bytes": measured, "seconds": t,
               "loras": {}}
        for rank in self.args.ranks:
            t0 = time.perf_counter()
            lora, path = make_lora(self.shape, rank, Path(self.tmp.name))
            self.loras[rank] = lora
            out["loras"][rank] = {"params": lora_params(lora), "targets": len(lora.targets),
                                  "file_bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}
            self.say(f"LoRA rank {rank}: {len(lora.targets)} targets, {lora_params(lora) / 1e6:.1f} M params, "
                     f"file {path.stat().st_size / MIB:.0f} MiB, built + loaded in {time.perf_counter() - t0:.1f} s")
        return out

    def resident(self) -> int:
        """Bytes allocated now (CUDA), or the weights' bytes (CPU, where nothing else is counted)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return sum(v.numel() * v.element_size() for v in self.weights.values())

    def copy_floor(self, lora) -> dict:
        keys = list(lora.targets)
        biggest = max(self.weights[k].numel() for k in keys)
        scratch = torch.empty(biggest, dtype=torch.bfloat16, device=self.device)

        def run():
            for k in keys:
                w = self.weights[k]
                scratch[: w.numel()].view(w.shape).copy_(w)

        run()  # warm
        times = [timed(self.device, run) for _ in range(3)]
        scratch = None  # noqa: F841 - free it before the merges
        nbytes = merged_bytes(self.weights, lora)
        floor = statistics.median(times)
        return {"seconds": floor, "times": times, "bytes_read_plus_written": 2 * nbytes,
                "bandwidth_gbs": 2 * nbytes / floor / 1e9}

    def merges(self) -> dict:
        from lora_ops import MergeOptions, MergeReport, merge_loras, restore

        out = {}
        sample = ["double_blocks.0.img_attn.qkv.weight", f"single_blocks.{self.shape.depth_single - 1}.linear1.weight"]
        for rank, lora in self.loras.items():
            floor = self.copy_floor(lora)
            self.say(f"rank {rank}: copy floor {floor['seconds'] * 1e3:.1f} ms for "
                     f"{floor['bytes_read_plus_written'] / GIB:.1f} GiB read+written "
                     f"({floor['bandwidth_gbs']:.0f} GB/s)")
            originals = {k: self.weights[k].clone() for k in sample}
            per_mode = {}
            # The default tile follows the device's free memory (lora_ops.rows.tile_budget); the fixed 64 MiB tile
            # shows what the time costs when memory is short. Targets: <= 2x the copy floor, <= 64 MiB extra VRAM.
            exact_state = None
            for exact, tile_bytes in ((True, None), (False, None), (True, 64 * MIB)):
                runs = []
                for rep in range(self.args.repeats):
                    if rep and self.left() < 120:
                        self.say("  (time budget: fewer repeats)")
                        break
                    report = MergeReport()
                    with Peak(self.device) as mem:
                        state = merge_loras(self.weights, [(lora, 1.0)], report=report,
                                            options=MergeOptions(exact_undo=exact, tile_bytes=tile_bytes))
                    check = None
                    if rep == 0:
                        check = self.check_merge(lora, originals, sample)
                    # Without a journal restore refuses; the merged bits are the same as with one, so the state
                    # of the exact merge (kept from the first mode) takes them out exactly.
                    undo_state = state if exact else exact_state
                    restore_s = timed(self.device, lambda st=undo_state: restore(self.weights, st))
                    if exact:
                        exact_state = state
                    exact_back = all(torch.equal(self.weights[k], originals[k]) for k in sample)
                    runs.append({"seconds": mem.seconds, "extra_bytes": mem.extra, "restore_seconds": restore_s,
                                 "journal_bytes": state.journal_bytes, "peak_tile_bytes": report.peak_tile_bytes,
                                 "restore_bit_exact_on_sample": exact_back, "check": check})
                    del state, undo_state
                med = statistics.median(r["seconds"] for r in runs)
                mode = ("exact_undo" if exact else "no_journal") + ("" if tile_bytes is None else "_tile_64mib")
                per_mode[mode] = {
                    "runs": runs, "median_seconds": med, "median_extra_bytes": statistics.median(r["extra_bytes"]
                                                                                                 for r in runs),
                    "over_floor": med / floor["seconds"], "tile_bytes": tile_bytes,
                    "targets_met": {"time_le_2x_copy_floor": med / floor["seconds"] <= 2,
                                    "extra_vram_le_64mib": runs[0]["extra_bytes"] <= 64 * MIB}}
                r0 = runs[0]
                self.say(f"  merge rank {rank} {mode}: {med:.3f} s median of {len(runs)} "
                         f"({med / floor['seconds']:.1f}x the copy floor), extra VRAM {r0['extra_bytes'] / MIB:.0f} MiB"
                         f" (tile {r0['peak_tile_bytes'] / MIB:.0f} MiB), journal {r0['journal_bytes'] / MIB:.0f} MiB"
                         f" in RAM, restore {r0['restore_seconds']:.3f} s, bit-exact "
                         f"{r0['restore_bit_exact_on_sample']}; check {r0['check']}")
            del originals
            out[rank] = {"floor": floor, **per_mode}
        return out

    def check_merge(self, lora, originals, sample) -> dict:
        """Merged sample weights vs an independent dense fp32 computation, in bf16 units."""
        worst, differing, total = 0.0, 0, 0
        for k in sample:
            ref = originals[k].float()
            for a in lora.targets[k]:
                up, down = a.up.to(self.device, torch.float32), a.down.to(self.device, torch.float32)
                ref[a.row_offset : a.row_offset + up.shape[0]] += a.scale * (up @ down)
            ref = ref.to(torch.bfloat16)
            diff = (self.weights[k].float() - ref.float()).abs()
            ulp = ref.float().abs().clamp_min(1e-30) * 2.0**-7
            worst = max(worst, float((diff / ulp).max()))
            differing += int((self.weights[k] != ref).sum())
            total += ref.numel()
            del ref, diff, ulp
        return {"max_ulps": round(worst, 3), "differing": differing, "of": total}

    def fp8(self) -> dict:
        try:
            from lora_ops import fp8
            cast = fp8.merge_to_fp8
            merge_fp8 = fp8.merge_loras_fp8
        except (ImportError, AttributeError) as e:
            self.say(f"fp8: not available ({e})")
            return {"available": False, "reason": str(e)}
        from lora_ops import MergeReport

        rank = min(self.loras)
        lora = self.loras[rank]
        with Peak(self.device) as mem:
            fp8_sd = cast(self.weights, [], "default")
        fp8_keys = [k for k, v in fp8_sd.items() if v.dtype == torch.float8_e4m3fn and v.dim() == 2]
        fp8_bytes = sum(fp8_sd[k].numel() for k in fp8_keys)
        out = {"available": True, "cast_seconds": mem.seconds, "cast_extra_bytes": mem.extra,
               "cast_kept_bytes": mem.end, "fp8_weight_bytes": fp8_bytes, "fp8_tensors": len(fp8_keys)}
        self.say(f"fp8 cast (policy default): {len(fp8_keys)} weights, {fp8_bytes / GIB:.2f} GiB fp8 in "
                 f"{mem.seconds:.2f} s, peak {mem.extra / GIB:.2f} GiB above the bf16 model "
                 f"(kept {mem.end / GIB:.2f} GiB)")
        targets = [k for k in lora.targets if k in fp8_sd and fp8_sd[k].dtype == torch.float8_e4m3fn]
        scratch = torch.empty(max(fp8_sd[k].numel() for k in targets), dtype=torch.uint8, device=self.device)

        def copy_all():
            for k in targets:
                scratch[: fp8_sd[k].numel()].copy_(fp8_sd[k].view(torch.uint8).reshape(-1))

        copy_all()
        floor = statistics.median(timed(self.device, copy_all) for _ in range(3))
        scratch = None  # noqa: F841 - free it before the merges
        runs = []
        for _ in range(max(1, min(self.args.repeats, 2))):
            report = MergeReport()
            with Peak(self.device) as m:
                state = merge_fp8(fp8_sd, [(lora, 1.0)], report=report)
            back = timed(self.device, lambda st=state: merge_fp8(fp8_sd, [], state=st))
            runs.append({"seconds": m.seconds, "extra_bytes": m.extra, "restore_seconds": back,
                         "journal_bytes": state.journal_bytes})
            del state
            if self.left() < 150:
                break
        med = statistics.median(r["seconds"] for r in runs)
        out.update(merge_rank=rank, merge_runs=runs, merge_median_seconds=med, copy_floor_seconds=floor,
                   merge_over_floor=med / floor)
        self.say(f"fp8 merge rank {rank} into scaled fp8 in place: {med:.3f} s ({med / floor:.1f}x the fp8 copy floor "
                 f"{floor * 1e3:.1f} ms), extra VRAM {runs[0]['extra_bytes'] / MIB:.0f} MiB, journal "
                 f"{runs[0]['journal_bytes'] / MIB:.0f} MiB, restore {runs[0]['restore_seconds']:.3f} s")
        fp8_sd.clear()  # the fp8 copy goes; the bf16 model stays for the forwards
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    def forward_once(self, label: str, runtime: Runtime, width: int, height: int, batch: int) -> dict:
        inputs = make_inputs(self.shape, width, height, batch, self.text_tokens, self.device)
        model = Flux(self.weights, self.shape, runtime)
        # One outer autocast context that stays *disabled*: the per-branch autocast inside (kohya's fp32
        # LoRA) then keeps its weight cache across forwards, as one autocast context over sampling does.
        outer = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=False)
        with torch.no_grad(), outer:
            with Peak(self.device) as warm:
                model.forward(*inputs)  # warm: workspaces, autocast cache (what stays is the cache)
            with Peak(self.device) as mem:
                y = model.forward(*inputs)
            del y
        del inputs
        return {"label": label, "width": width, "height": height, "batch": batch, "activation_bytes": mem.extra,
                "seconds": mem.seconds, "resident_after_warm_bytes": warm.end}

    def forwards(self) -> dict:
        from lora_ops import merge_loras, restore

        out = {}
        w, h = self.width, self.height
        base_alloc = self.resident()
        # warm-up at a small size: cuBLAS workspace and kernels exist before anything is measured
        self.forward_once("warm-up", Runtime(), 64, 64, 1)
        runs = [("none", None, w, h, 1), ("none", None, w, h, 2), ("none", None, w // 2, h // 2, 1)]
        for label, _, rw, rh, b in runs:
            r = self.forward_once(label, Runtime(), rw, rh, b)
            r["total_bytes"] = self.resident() + r["activation_bytes"]
            out[f"none {rw}x{rh} b{b}"] = r
            self.say(f"forward no LoRA {rw}x{rh} batch {b}: activations {r['activation_bytes'] / MIB:.0f} MiB, "
                     f"total {r['total_bytes'] / GIB:.2f} GiB, {r['seconds'] * 1e3:.0f} ms")
        for rank, lora in self.loras.items():
            before = self.resident()
            runtime, params = unmerged_runtime(lora, self.device)
            fp32_bytes = sum(p.numel() * p.element_size() for p in params)
            r = self.forward_once(f"unmerged r{rank}", runtime, w, h, 1)
            r["lora_fp32_bytes"] = fp32_bytes
            r["lora_resident_bytes"] = fp32_bytes + r["resident_after_warm_bytes"]
            r["total_bytes"] = before + r["lora_resident_bytes"] + r["activation_bytes"]
            out[f"unmerged r{rank}"] = r
            self.say(f"forward unmerged rank {rank}: LoRA resident {r['lora_resident_bytes'] / MIB:.0f} MiB "
                     f"(fp32 {fp32_bytes / MIB:.0f} + autocast cache {r['resident_after_warm_bytes'] / MIB:.0f}), "
                     f"activations {r['activation_bytes'] / MIB:.0f} MiB, total {r['total_bytes'] / GIB:.2f} GiB, "
                     f"{r['seconds'] * 1e3:.0f} ms")
            del runtime, params
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.left() < 60:
                self.say("  (time budget: skipping further LoRA forwards)")
                break
        rank = min(self.loras)
        state = merge_loras(self.weights, [(self.loras[rank], 1.0)])
        r = self.forward_once(f"merged r{rank}", Runtime(), w, h, 1)
        r["total_bytes"] = self.resident() + r["activation_bytes"]
        out[f"merged r{rank}"] = r
        restore(self.weights, state)
        del state
        none = out[f"none {w}x{h} b1"]["activation_bytes"]
        r["vs_none"] = r["activation_bytes"] / none - 1
        self.say(f"forward merged rank {rank}: activations {r['activation_bytes'] / MIB:.0f} MiB "
                 f"({100 * r['vs_none']:+.2f} % vs no LoRA; target within 1 %: "
                 f"{'met' if abs(r['vs_none']) <= 0.01 else 'MISSED'}), {r['seconds'] * 1e3:.0f} ms")
        out["weights_allocated_bytes"] = base_alloc
        return out

    def planner(self, forwards: dict | None, merges: dict | None) -> dict:
        from lora_ops import planner
        from lora_ops.synthetic import write_flux_checkpoint

        if self.shape != planner.PRESETS["flux-dev"]:  # the planner reads this shape from a checkpoint header
            model = str(write_flux_checkpoint(Path(self.tmp.name) / "shape.safetensors", self.shape))
        else:
            model = "flux-dev"
        common = dict(model=model, dtype="bf16", text_encoder="offload", clip="offload", vae="offload",
                      text_tokens=self.text_tokens)
        rows = []

        def compare(what: str, predicted: int, measured: int) -> None:
            err = predicted / measured - 1 if measured else float("nan")
            rows.append({"what": what, "predicted_bytes": predicted, "measured_bytes": measured, "error": err,
                         "within_10pct": abs(err) <= 0.10})
            self.say(f"  {what:48} predicted {predicted / MIB:10.1f} MiB  measured {measured / MIB:10.1f} MiB  "
                     f"{100 * err:+6.1f} %  {'ok' if abs(err) <= 0.10 else 'OFF BY > 10 %'}")

        self.say("planner vs measurement:")
        base = planner.plan(**common)
        if forwards:
            compare("weights", base.weight_bytes, forwards["weights_allocated_bytes"])
            for key, r in forwards.items():
                if not isinstance(r, dict) or "activation_bytes" not in r:
                    continue
                kw = dict(common, width=r["width"], height=r["height"], batch=r["batch"])
                if key.startswith("unmerged"):
                    rank = int(key.split("r")[-1])
                    p = planner.plan(**kw, lora_rank=rank, mode="unmerged")
                    compare(f"{key}: LoRA resident", p.lora_resident_bytes, r["lora_resident_bytes"])
                elif key.startswith("merged"):
                    rank = int(key.split("r")[-1])
                    p = planner.plan(**kw, lora_rank=rank, mode="merged")
                else:
                    p = planner.plan(**kw)
                compare(f"{key}: activations ({p.activation_at})", p.activation_bytes, r["activation_bytes"])
                compare(f"{key}: total", p.sampling_bytes, r["total_bytes"])
        if merges:
            for rank, m in merges.items():
                p = planner.plan(**common, lora_rank=rank, mode="merged")
                # the planner sizes tiles at the 64 MiB default; on a GPU the default tile follows free memory
                modes = ("exact_undo", "no_journal") if self.device.type == "cpu" else ("exact_undo_tile_64mib",)
                for mode in modes:
                    if mode in m:
                        measured = int(m[mode]["median_extra_bytes"])
                        label = f"merge r{rank} {mode}: extra (tile + fp32 factors)"
                        if self.device.type == "cpu" and "exact_undo" in m:
                            # on the CPU the journal (system RAM; held during every call) is in the same pool
                            measured -= int(m["exact_undo"]["runs"][0]["journal_bytes"])
                            label += ", minus journal"
                        compare(label, int(p.merge["ours_bytes"]), measured)
        return {"rows": rows, "all_within_10pct": all(r["within_10pct"] for r in rows)}

    def run(self) -> int:
        self.results["environment"] = self.section("environment", self.environment)
        if self.section("build", self.build) is None:
            return 1
        merges = self.section("merge", self.merges)
        if self.left() > 150:
            self.section("fp8", self.fp8)
        else:
            self.say("fp8: skipped (time budget)")
        forwards = self.section("forward", self.forwards) if self.left() > 60 else None
        self.section("planner", self.planner, forwards, merges)
        self.say(f"done in {self.elapsed():.0f} s; results in {self.out}/gpu_suite.json and gpu_suite.txt")
        self.save()
        self.tmp.cleanup()
        return 0 if not self.results["errors"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results directory (default: $OUT, else ./bench_results)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny Flux shape (checks the code paths, e.g. on CPU)")
    parser.add_argument("--blocks", type=int, default=0, help="real width 3072 with N double + N single blocks")
    parser.add_argument("--size", type=int, default=0, help="image side in pixels (default 1024; 256 with --tiny)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=450, help="skip optional work past this many seconds")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny", file=sys.stderr)
        return 2
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
