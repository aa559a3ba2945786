"""CPU benchmark of the in-place merge: lora_ops tiles vs a full-layer fp32 merge vs a plain copy.

Run by hand (never a unit test):

    PYTHONPATH=. python bench/bench_merge_cpu.py [--repeats 3] [--rank 32] [--json out.json]
    COMFYUI_ROOT=/work/comfyui PYTHONPATH=. python bench/bench_merge_cpu.py   # also time ComfyUI's patching

Model: real width 3072, 1 double + 1 single block (lora_ops.synthetic.flux_state_dict), bf16. LoRA:
kohya rank 32 on every block Linear (lora_ops.synthetic.write_kohya_lora). All on the CPU, default
torch threads. Each method runs `--repeats` times; the median time is reported.

  (a) lora_ops.merge_loras in place (default 64 MiB tile), with and without the exact-undo journal;
  (b) the full-layer fp32 method as ComfyUI writes it per key: temp = W.float(); diff = up.float() @
      down.float(); temp += strength*scale*diff; W_new = temp.to(bf16) (copied back into W here, so no
      backup is kept; ComfyUI also keeps the original alive as its backup);
  (c) the memory-traffic floor: W.copy_(other) for every merged weight.

Peak extra memory = process RSS high-water mark (VmHWM, reset through /proc/self/clear_refs; a 1 ms
RSS sampler where that is not permitted) minus the RSS just before the call, after malloc_trim, with
the model and LoRA already loaded. The exact-undo journal kept in RAM is part of that figure and is
also reported on its own (MergeState.journal_bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

MIB = 1 << 20
SAMPLE_KEY = "single_blocks.0.linear1.weight"


# --- memory measurement ----------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def trim() -> None:
    """Hand freed heap back to the OS so that the next baseline is the live set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Extra RSS high-water over the RSS at entry (VmHWM reset, or a 1 ms sampling thread)."""

    use_hwm = _can_reset_hwm()

    def __enter__(self) -> PeakRSS:
        trim()
        self.baseline = rss_bytes()
        if self.use_hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self._stop = threading.Event()
            self._max = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.use_hwm:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes())
        self.extra = self.peak - self.baseline


def machine() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = re.search(r"Model name:\s+(.+)", out).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# --- the methods ---------------------------------------------------------------------------------

def full_layer_fp32(weights: dict[str, torch.Tensor], lora, strength: float = 1.0) -> None:
    """ComfyUI's per-key arithmetic (weight_adapter/lora.py), dense fp32, then round to the storage dtype."""
    for key, adapters in lora.targets.items():
        w = weights[key]
        temp = w.float()
        for a in adapters:
            diff = a.up.float() @ a.down.float()
            temp[a.row_offset : a.row_offset + diff.shape[0]] += strength * a.scale * diff
            del diff
        w_new = temp.to(w.dtype)
        del temp
        w.copy_(w_new)
        del w_new


def copy_floor(weights: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    for key, other in source.items():
        weights[key].copy_(other)


def timed(fn, repeats: int, before=None) -> tuple[list[float], list[int], list]:
    times, extras, results = [], [], []
    for _ in range(repeats):
        if before is not None:
            before()
        with PeakRSS() as mem:
            start = time.perf_counter()
            results.append(fn())
            times.append(time.perf_counter() - start)
        extras.append(mem.extra)
    return times, extras, results


def profile_merge(weights, lora, exact_undo: bool) -> str:
    """Where the time goes in one merge: torch ops and the engine's Python functions."""
    import cProfile
    import io
    import pstats

    from lora_ops.merge import MergeOptions, merge_loras, restore

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        state = merge_loras(weights, [(lora, 1.0)], options=MergeOptions(exact_undo=exact_undo))
    restore(weights, state)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    pr = cProfile.Profile()
    pr.enable()
    state = merge_loras(weights, [(lora, 1.0)], options=MergeOptions(exact_undo=exact_undo))
    pr.disable()
    restore(weights, state)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(r"lora_ops", 18)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    return table + "\n" + "\n".join(lines[-24:])


# --- ComfyUI (a child process in ComfyUI's own venv) ----------------------------------------------------

def comfy_child(ckpt: str, lora_path: str, sample_out: str) -> None:
    root = os.environ["COMFYUI_ROOT"]
    sys.path.insert(0, root)
    argv = sys.argv
    sys.argv = [argv[0], "--cpu", "--bf16-unet"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    sys.argv = argv
    import logging

    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    model = comfy.sd.load_diffusion_model(ckpt, model_options={"dtype": torch.bfloat16})
    lora_sd = comfy.utils.load_torch_file(lora_path, safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
    load_s = time.perf_counter() - t0
    keys = len(patched.patches)
    with PeakRSS() as mem:
        start = time.perf_counter()
        patched.patch_model()
        seconds = time.perf_counter() - start
    sd = patched.model.diffusion_model.state_dict()
    from safetensors.torch import save_file

    save_file({SAMPLE_KEY: sd[SAMPLE_KEY].contiguous()}, sample_out)
    print(json.dumps({"comfyui_version": _comfy_version(root), "torch": torch.__version__, "load_s": load_s,
                      "patch_s": seconds, "extra_bytes": mem.extra, "patched_keys": keys,
                      "weight_dtype": str(sd[SAMPLE_KEY].dtype)}))


def _comfy_version(root: str) -> str:
    try:
        text = Path(root, "comfyui_version.py").read_text()
        return re.search(r'__version__ = "([^"]+)"', text).group(1)
    except (OSError, AttributeError):
        return "unknown"


def run_comfy(shape, lora_path: Path, tmp: Path, ours_sample: torch.Tensor) -> dict | None:
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        print("\nComfyUI: skipped (set COMFYUI_ROOT=/work/comfyui to time ComfyUI's own patching)")
        return None
    from lora_ops.synthetic import write_flux_checkpoint

    python = os.environ.get("COMFYUI_PYTHON") or ("/work/venv/bin/python" if Path("/work/venv/bin/python").exists()
                                                  else sys.executable)
    ckpt = write_flux_checkpoint(tmp / "model.safetensors", shape, seed=0)
    sample = tmp / "comfy_sample.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([python, __file__, "--comfy-child", str(ckpt), str(lora_path), str(sample)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"\nComfyUI: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from safetensors.torch import load_file

    theirs = load_file(str(sample))[SAMPLE_KEY]
    diff = (theirs.float() - ours_sample.float()).abs()
    result["sample_max_abs_diff_vs_ours"] = float(diff.max())
    result["sample_differing_elements"] = int((theirs != ours_sample).sum())
    result["python"] = python
    return result


# --- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--profile", action="store_true", help="profile our merge even when targets are met")
    parser.add_argument("--comfy-child", nargs=3, metavar=("CKPT", "LORA", "SAMPLE_OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.comfy_child:
        comfy_child(*args.comfy_child)
        return 0

    from lora_ops import MergeOptions, MergeReport, load_lora, merge_loras, restore
    from lora_ops.flux import FluxShape, parameter_count
    from lora_ops.merge import DEFAULT_TILE_BYTES
    from lora_ops.synthetic import flux_state_dict, write_kohya_lora

    shape = FluxShape(depth=1, depth_single=1)
    print(f"machine: {machine()}; RSS peak via {'VmHWM reset' if PeakRSS.use_hwm else '1 ms sampling'}")
    weights = flux_state_dict(shape, seed=0)
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = Path(tmp_dir.name)
    lora_path = write_kohya_lora(tmp / "lora.safetensors", shape, rank=args.rank, seed=1)
    lora = load_lora(lora_path)
    targets = list(lora.targets)
    originals = {k: weights[k].clone() for k in targets}
    merged_elems = sum(weights[k].numel() for k in targets)
    merged_bytes = sum(weights[k].numel() * weights[k].element_size() for k in targets)
    print(f"model: width {shape.hidden}, 1 double + 1 single block, {parameter_count(shape) / 1e6:.0f} M params bf16; "
          f"LoRA: kohya rank {args.rank}, {len(targets)} weights, {merged_elems / 1e6:.0f} M elements merged "
          f"({merged_bytes / MIB:.0f} MiB)")

    def reset() -> None:
        copy_floor(weights, originals)

    results: dict[str, object] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rank": args.rank,
                                  "merged_elements": merged_elems, "merged_bytes": merged_bytes,
                                  "repeats": args.repeats, "tile_bytes": DEFAULT_TILE_BYTES}
    ours: dict[str, dict] = {}
    ours_sample = None
    for exact in (True, False):
        reports: list[MergeReport] = []

        def run(exact=exact, reports=reports):
            report = MergeReport()
            state = merge_loras(weights, [(lora, 1.0)], options=MergeOptions(exact_undo=exact), report=report)
            reports.append(report)
            return state

        times, extras, states = timed(run, args.repeats, before=reset)
        if exact:
            ours_sample = weights[SAMPLE_KEY].clone()
            restore(weights, states[-1])
            assert all(torch.equal(weights[k], originals[k]) for k in targets), "exact undo did not restore"
        ours[str(exact)] = {"times_s": times, "median_s": statistics.median(times), "extra_bytes": extras,
                            "median_extra_bytes": statistics.median(extras),
                            "peak_tile_bytes": reports[-1].peak_tile_bytes,
                            "journal_bytes": states[-1].journal_bytes}
        del states
    reset()
    times, extras, _ = timed(lambda: full_layer_fp32(weights, lora), args.repeats, before=reset)
    full = {"times_s": times, "median_s": statistics.median(times), "extra_bytes": extras,
            "median_extra_bytes": statistics.median(extras)}
    full_sample = weights[SAMPLE_KEY].clone()
    times, extras, _ = timed(lambda: copy_floor(weights, originals), args.repeats)
    floor = {"times_s": times, "median_s": statistics.median(times), "bandwidth_gbs": 2 * merged_bytes
             / statistics.median(times) / 1e9}
    same = (ours_sample.float() - full_sample.float()).abs()
    results.update(ours_exact_undo=ours["True"], ours_no_journal=ours["False"], full_layer_fp32=full,
                   copy_floor=floor, sample_max_abs_diff_ours_vs_full=float(same.max()),
                   sample_differing_elements=int((ours_sample != full_sample).sum()))

    print(f"\n{'method':42}{'median s':>10}{'extra MiB':>11}   runs (s)")
    rows = [("(a) lora_ops tiles, exact undo (journal)", ours["True"]),
            ("(a') lora_ops tiles, exact_undo=False", ours["False"]),
            ("(b) full-layer fp32 (ComfyUI arithmetic)", full)]
    for label, r in rows:
        print(f"{label:42}{r['median_s']:10.3f}{r['median_extra_bytes'] / MIB:11.1f}   "
              + ", ".join(f"{t:.3f}" for t in r["times_s"]))
    print(f"{'(c) copy floor (W.copy_ per merged weight)':42}{floor['median_s']:10.3f}{'':>11}   "
          + ", ".join(f"{t:.3f}" for t in floor["times_s"]) + f"  ({floor['bandwidth_gbs']:.1f} GB/s read+write)")
    print(f"\nengine: MergeReport.peak_tile_bytes {ours['True']['peak_tile_bytes'] / MIB:.1f} MiB; "
          f"MergeState.journal_bytes {ours['True']['journal_bytes'] / MIB:.1f} MiB "
          f"({ours['True']['journal_bytes'] / merged_elems:.3f} B per merged element, system RAM; 0 without exact undo)")
    print(f"check: ours vs full-layer on {SAMPLE_KEY}: max |diff| {results['sample_max_abs_diff_ours_vs_full']:.3g}, "
          f"{results['sample_differing_elements']} differing elements (both round fp32 math once)")

    verdicts = {}
    print("\nratios (targets in brackets):")
    for label, key in (("exact undo", "True"), ("exact_undo=False", "False")):
        r = ours[key]
        mem_ratio = r["median_extra_bytes"] / full["median_extra_bytes"]
        time_full = r["median_s"] / full["median_s"]
        time_floor = r["median_s"] / floor["median_s"]
        extra_mib = r["median_extra_bytes"] / MIB
        transient_mib = (r["median_extra_bytes"] - r["journal_bytes"]) / MIB
        verdicts[key] = {"extra_mem_ours_over_full": mem_ratio, "time_ours_over_full": time_full,
                         "time_ours_over_copy_floor": time_floor, "extra_mib": extra_mib,
                         "extra_mib_without_journal": transient_mib}
        print(f"  {label}: extra memory ours/full-layer {mem_ratio:.3f} [<= 0.2: {'met' if mem_ratio <= 0.2 else 'MISSED'}]"
              f"; time ours/full-layer {time_full:.2f}; time ours/copy floor {time_floor:.1f} "
              f"[<= 2: {'met' if time_floor <= 2 else 'MISSED'}]; extra {extra_mib:.1f} MiB "
              f"[<= 64: {'met' if extra_mib <= 64 else 'MISSED'}] ({transient_mib:.1f} MiB without the journal)")
    results["ratios"] = verdicts
    missed = any(v["time_ours_over_copy_floor"] > 2 or v["extra_mib"] > 64 or v["extra_mem_ours_over_full"] > 0.2
                 for v in verdicts.values())
    if missed or args.profile:
        print("\nprofile of one merge (exact undo):")
        reset()
        text = profile_merge(weights, lora, exact_undo=True)
        print(text)
        results["profile_exact_undo"] = text
        print("\nprofile of one merge (exact_undo=False):")
        reset()
        text = profile_merge(weights, lora, exact_undo=False)
        print(text)
        results["profile_no_journal"] = text

    comfy = run_comfy(shape, lora_path, tmp, ours_sample)
    if comfy is not None:
        results["comfyui"] = comfy
        print(f"\nComfyUI {comfy['comfyui_version']} (torch {comfy['torch']}, --cpu --bf16-unet): patch_model() "
              f"{comfy['patch_s']:.3f} s, extra RSS {comfy['extra_bytes'] / MIB:.0f} MiB, {comfy['patched_keys']} "
              f"patched keys, weights {comfy['weight_dtype']}; sample key vs ours: max |diff| "
              f"{comfy['sample_max_abs_diff_vs_ours']:.3g} ({comfy['sample_differing_elements']} elements differ)")
        print(f"  ours/ComfyUI time {ours['True']['median_s'] / comfy['patch_s']:.2f} (exact undo), "
              f"{ours['False']['median_s'] / comfy['patch_s']:.2f} (no journal); single run, its own process")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    tmp_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
