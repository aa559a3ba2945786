"""CPU benchmark of the in-place merge: lora_ops tiles vs a full-layer fp32 merge vs a plain copy.

Run by hand (never a unit test):

    PYTHONPATH=. python bench/bench_merge_cpu.py [--repeats 3] [--rank 32] [--json out.json]
    COMFYUI_ROOT=../shared/comfyui/0.3.64 COMFYUI_PYTHON=<ComfyUI's venv python> PYTHONPATH=. \
        python bench/bench_merge_cpu.py   # also time ComfyUI's patching (bench/comfy_patch.py)

Model: real width 3072, 1 double + 1 single block (lora_ops.synthetic.flux_state_dict), bf16. LoRA:
kohya rank 32 on every block Linear (lora_ops.synthetic.write_kohya_lora). All on the CPU, default
torch threads.

  (a) lora_ops.merge_loras in place (default 64 MiB tile), with and without the exact-undo journal;
  (b) the full-layer fp32 method as ComfyUI writes it per key: temp = W.float(); diff = up.float() @
      down.float(); temp += strength*scale*diff; W_new = temp.to(bf16) (copied back into W here, so no
      backup is kept; ComfyUI also keeps the original alive as its backup);
  (c) the memory-traffic floor: W.copy_(other) for every merged weight.

Time: one untimed warm-up round, then `--repeats` interleaved rounds (a, a', b, c, a, a', b, c, ...);
the median is reported, and ratios are medians of per-round ratios (robust to a shared machine's load).
The cold first run of each method (fresh pages from the OS) is reported on its own.

Peak extra memory, from one cold run of each method: process RSS high-water mark (VmHWM, reset through
/proc/self/clear_refs; a 1 ms RSS sampler where that is not permitted) minus the RSS just before the
call, after malloc_trim, with the model and LoRA already loaded; and the peak of live tensor bytes
(torch.profiler memory events), which leaves out the C allocator's caching. The exact-undo journal kept
in RAM is part of both and is also reported on its own (MergeState.journal_bytes).
"""

from __future__ import annotations

import argparse
import contextlib
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

from lora_ops.units import MIB

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


def run_once(fn, before=None, rss: bool = False) -> tuple[dict, object]:
    """One run of `fn`: wall and CPU seconds; with `rss`, first malloc_trim and then the RSS high-water."""
    if before is not None:
        before()
    mem = PeakRSS() if rss else contextlib.nullcontext()
    with mem:
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {"wall_s": wall, "cpu_s": cpu, "load1": os.getloadavg()[0]}
    if rss:
        out["extra_rss_bytes"] = mem.extra
    return out, result


def summarise(runs: list[dict]) -> dict:
    return {"runs": runs, "wall_s": statistics.median(r["wall_s"] for r in runs),
            "wall_min_s": min(r["wall_s"] for r in runs), "cpu_s": statistics.median(r["cpu_s"] for r in runs)}


def tensor_peak(fn, before=None) -> int:
    """Peak of live tensor bytes allocated during `fn` (torch.profiler memory events): the engine's own
    working set, without the allocator's caching and fragmentation that RSS also shows."""
    from torch.profiler import ProfilerActivity, profile

    if before is not None:
        before()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def profile_merge(weights, lora, exact_undo: bool) -> str:
    """Where the time goes in one merge: torch ops and the engine's Python functions."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from lora_ops.merge import MergeOptions, merge_loras, restore

    originals = {k: weights[k].clone() for k in lora.targets}

    def put_back(state) -> None:  # a merge without exact undo cannot be restored: copy the originals back
        if exact_undo:
            restore(weights, state)
        else:
            for k, v in originals.items():
                weights[k].copy_(v)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        state = merge_loras(weights, [(lora, 1.0)], options=MergeOptions(exact_undo=exact_undo))
    put_back(state)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    pr = cProfile.Profile()
    pr.enable()
    state = merge_loras(weights, [(lora, 1.0)], options=MergeOptions(exact_undo=exact_undo))
    pr.disable()
    put_back(state)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(r"lora_ops", 18)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    return table + "\n" + "\n".join(lines[-24:])


# --- main ----------------------------------------------------------------------------------------

LABELS = {"ours_exact_undo": "(a) lora_ops tiles, exact undo (journal)",
          "ours_no_journal": "(a') lora_ops tiles, exact_undo=False",
          "full_layer_fp32": "(b) full-layer fp32 (ComfyUI arithmetic)",
          "copy_floor": "(c) copy floor (W.copy_ per merged weight)"}
OURS = ("ours_exact_undo", "ours_no_journal")


class Setup:
    """The model, the LoRA and the four methods, each a function that runs once on `weights`."""

    def __init__(self, rank: int) -> None:
        from lora_ops import MergeOptions, MergeReport, load_lora, merge_loras
        from lora_ops.flux import FluxShape
        from lora_ops.synthetic import flux_state_dict, write_kohya_lora

        self.shape = FluxShape(depth=1, depth_single=1)
        self.weights = flux_state_dict(self.shape, seed=0)
        self.tmp_dir = tempfile.TemporaryDirectory()
        self.tmp = Path(self.tmp_dir.name)
        self.lora_path = write_kohya_lora(self.tmp / "lora.safetensors", self.shape, rank=rank, seed=1)
        self.lora = load_lora(self.lora_path)
        self.targets = list(self.lora.targets)
        self.originals = {k: self.weights[k].clone() for k in self.targets}
        self.merged_elems = sum(self.weights[k].numel() for k in self.targets)
        self.merged_bytes = sum(self.weights[k].numel() * self.weights[k].element_size() for k in self.targets)
        self.reports: dict[str, MergeReport] = {}

        def ours(exact: bool):
            def run():
                report = MergeReport()
                state = merge_loras(self.weights, [(self.lora, 1.0)], options=MergeOptions(exact_undo=exact),
                                    report=report)
                self.reports[str(exact)] = report
                return state
            return run

        self.fns = {"ours_exact_undo": ours(True), "ours_no_journal": ours(False),
                    "full_layer_fp32": lambda: full_layer_fp32(self.weights, self.lora),
                    "copy_floor": lambda: copy_floor(self.weights, self.originals)}

    def reset(self) -> None:
        copy_floor(self.weights, self.originals)

    def before(self, name: str):
        return None if name == "copy_floor" else self.reset


def measure(setup: Setup, repeats: int) -> tuple[dict, dict, dict, dict]:
    """Cold runs (memory), then interleaved warm rounds (time). Returns (methods, per-round runs, samples of
    SAMPLE_KEY after each method, our merge states from the cold runs)."""
    cold: dict[str, dict] = {}
    states: dict[str, object] = {}
    for name, fn in setup.fns.items():  # one cold run of each (malloc_trim, then the RSS high-water)
        r, result = run_once(fn, before=setup.before(name), rss=True)
        cold[name] = r
        if name in OURS:
            states[name] = result
        del result
    # A warm-up round, then interleaved rounds (a, a', b, c, a, a', b, c, ...) with the allocator warm. Fresh pages
    # are expensive in a VM (a cold first merge takes several times longer), and on a shared machine whose load
    # changes by the minute the methods of one round see about the same conditions, so the per-round ratios are
    # the robust figures.
    runs: dict[str, list[dict]] = {k: [] for k in setup.fns}
    samples: dict[str, torch.Tensor] = {}
    for round_ in range(repeats + 1):
        for name, fn in setup.fns.items():
            r, result = run_once(fn, before=setup.before(name))
            if round_:
                runs[name].append(r)
            if name != "copy_floor":
                samples[name] = setup.weights[SAMPLE_KEY].clone()
            del result
    methods = {name: summarise(r) for name, r in runs.items()}
    for name, r in cold.items():
        methods[name].update(cold_wall_s=r["wall_s"], extra_rss_bytes=r.get("extra_rss_bytes", 0))
    return methods, runs, samples, states


def engine_figures(setup: Setup, methods: dict, states: dict) -> None:
    """Tile, reserve and journal sizes, a bit-exact restore, and the peak of live tensor bytes per method."""
    from lora_ops import merge_loras, restore

    exact = methods["ours_exact_undo"]
    exact.update(peak_tile_bytes=setup.reports["True"].peak_tile_bytes,
                 reserve_bytes=setup.reports["True"].reserve_bytes,
                 journal_bytes=states["ours_exact_undo"].journal_bytes)
    methods["ours_no_journal"].update(peak_tile_bytes=setup.reports["False"].peak_tile_bytes, journal_bytes=0)
    setup.reset()
    state = merge_loras(setup.weights, [(setup.lora, 1.0)])
    restore(setup.weights, state)
    exact["restore_bit_exact"] = all(torch.equal(setup.weights[k], setup.originals[k]) for k in setup.targets)
    del state
    for name in ("ours_exact_undo", "ours_no_journal", "full_layer_fp32"):
        methods[name]["tensor_peak_bytes"] = tensor_peak(setup.fns[name], before=setup.reset)
    setup.reset()
    floor = methods["copy_floor"]
    floor["bandwidth_gbs"] = 2 * setup.merged_bytes / floor["wall_s"] / 1e9


def ratios(methods: dict, runs: dict) -> dict:
    """Ours against the full-layer method and the copy floor: medians of per-round ratios for wall time."""
    full, floor = methods["full_layer_fp32"], methods["copy_floor"]
    out = {}
    for key in OURS:
        r = methods[key]
        out[key] = {
            "extra_rss_ours_over_full": r["extra_rss_bytes"] / full["extra_rss_bytes"],
            "tensor_peak_ours_over_full": r["tensor_peak_bytes"] / full["tensor_peak_bytes"],
            "wall_ours_over_full": statistics.median(a["wall_s"] / b["wall_s"]
                                                     for a, b in zip(runs[key], runs["full_layer_fp32"])),
            "cpu_ours_over_full": r["cpu_s"] / full["cpu_s"],
            "wall_ours_over_copy_floor": statistics.median(a["wall_s"] / c["wall_s"]
                                                           for a, c in zip(runs[key], runs["copy_floor"])),
            "cpu_ours_over_copy_floor": r["cpu_s"] / floor["cpu_s"],
            "min_wall_ours_over_min_copy_floor": r["wall_min_s"] / floor["wall_min_s"],
            "extra_rss_mib": r["extra_rss_bytes"] / MIB, "tensor_peak_mib": r["tensor_peak_bytes"] / MIB,
            "tensor_peak_without_journal_mib": (r["tensor_peak_bytes"] - r["journal_bytes"]) / MIB}
    return out


def print_methods(setup: Setup, results: dict, methods: dict, load_before: tuple) -> None:
    print(f"\n{'method':44}{'wall s':>8}{'min s':>8}{'cpu s':>8}{'cold s':>8}{'RSS+ MiB':>10}{'tensors MiB':>13}"
          "   warm wall runs (s)")
    for key, label in LABELS.items():
        r = methods[key]
        rss = f"{r['extra_rss_bytes'] / MIB:10.0f}" if key != "copy_floor" else f"{'':>10}"
        tp = f"{r['tensor_peak_bytes'] / MIB:13.1f}" if "tensor_peak_bytes" in r else f"{'':>13}"
        print(f"{label:44}{r['wall_s']:8.3f}{r['wall_min_s']:8.3f}{r['cpu_s']:8.3f}{r['cold_wall_s']:8.2f}{rss}{tp}   "
              + ", ".join(f"{x['wall_s']:.3f}" for x in r["runs"]))
    print(f"copy floor bandwidth {methods['copy_floor']['bandwidth_gbs']:.1f} GB/s (read + write); load average "
          f"{load_before[0]:.1f} before, {results['load_average_after'][0]:.1f} after (2 cores: above 2 the timings "
          "include waiting for the CPU)")
    ex = methods["ours_exact_undo"]
    print(f"engine: MergeReport.peak_tile_bytes {ex['peak_tile_bytes'] / MIB:.1f} MiB; rollback reserve "
          f"{ex['reserve_bytes'] / MIB:.1f} MiB; MergeState.journal_bytes "
          f"{ex['journal_bytes'] / MIB:.1f} MiB ({ex['journal_bytes'] / setup.merged_elems:.3f} B per merged element, "
          f"system RAM; 0 without exact undo); restore bit-exact: {ex['restore_bit_exact']}")
    print(f"check: ours vs full-layer on {SAMPLE_KEY}: max |diff| {results['sample_max_abs_diff_ours_vs_full']:.3g}, "
          f"{results['sample_differing_elements']} differing elements (both round fp32 math once)")


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_ratios(verdicts: dict) -> None:
    print("\nratios (targets in brackets; memory = RSS high-water above the loaded model, and live tensor bytes):")
    for key, v in verdicts.items():
        print(f"  {LABELS[key]}:")
        print(f"    extra memory ours/full-layer: RSS {v['extra_rss_ours_over_full']:.3f}, tensors "
              f"{v['tensor_peak_ours_over_full']:.3f} [<= 0.2: {_mark(v['extra_rss_ours_over_full'] <= 0.2)} (RSS), "
              f"{_mark(v['tensor_peak_ours_over_full'] <= 0.2)} (tensors)]")
        print(f"    time ours/copy floor: wall {v['wall_ours_over_copy_floor']:.1f} (median of per-round ratios; "
              f"fastest runs {v['min_wall_ours_over_min_copy_floor']:.1f}), cpu {v['cpu_ours_over_copy_floor']:.1f} "
              f"[<= 2: {_mark(v['wall_ours_over_copy_floor'] <= 2)}]; time ours/full-layer: wall "
              f"{v['wall_ours_over_full']:.2f} [<= 0.5: {_mark(v['wall_ours_over_full'] <= 0.5)}], cpu "
              f"{v['cpu_ours_over_full']:.2f}")
        print(f"    extra MiB: RSS {v['extra_rss_mib']:.0f}, tensors {v['tensor_peak_mib']:.1f} "
              f"({v['tensor_peak_without_journal_mib']:.1f} without the journal) [<= 64: "
              f"{_mark(v['extra_rss_mib'] <= 64)} (RSS), {_mark(v['tensor_peak_mib'] <= 64)} (tensors)]")


def print_comfy(comfy: dict, methods: dict) -> None:
    comfy_runs = ", ".join(f"{r['wall_s']:.2f}" for r in comfy["runs"])
    print(f"\nComfyUI {comfy['comfyui_version']} (torch {comfy['torch']}, --cpu --bf16-unet), own process: "
          f"patch_model() {comfy['patch_s']:.3f} s (warm median; cold first run, then warm: {comfy_runs} s), "
          f"cold-run extra RSS {comfy['extra_bytes'] / MIB:.0f} MiB, {comfy['patched_keys']} patched keys, weights "
          f"{comfy['weight_dtype']}; {SAMPLE_KEY} vs ours: max |diff| {comfy['sample_max_abs_diff_vs_ours']:.3g} "
          f"({comfy['sample_differing_elements']} elements differ)")
    print(f"  ours/ComfyUI wall time: {methods['ours_exact_undo']['wall_s'] / comfy['patch_s']:.2f} (exact undo), "
          f"{methods['ours_no_journal']['wall_s'] / comfy['patch_s']:.2f} (no journal)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--profile", action="store_true", help="profile our merge even when targets are met")
    args = parser.parse_args()

    from lora_ops.flux import parameter_count
    from lora_ops.rows import DEFAULT_TILE_BYTES

    load_before = os.getloadavg()
    print(f"machine: {machine()}; RSS peak via {'VmHWM reset' if PeakRSS.use_hwm else '1 ms sampling'}; "
          f"load average {load_before[0]:.1f}; "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    setup = Setup(args.rank)
    print(f"model: width {setup.shape.hidden}, 1 double + 1 single block, {parameter_count(setup.shape) / 1e6:.0f} M "
          f"params bf16; LoRA: kohya rank {args.rank}, {len(setup.targets)} weights, {setup.merged_elems / 1e6:.0f} M "
          f"elements merged ({setup.merged_bytes / MIB:.0f} MiB)")
    results: dict[str, object] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rank": args.rank,
                                  "merged_elements": setup.merged_elems, "merged_bytes": setup.merged_bytes,
                                  "repeats": args.repeats, "tile_bytes": DEFAULT_TILE_BYTES,
                                  "load_average_before": load_before,
                                  "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    methods, runs, samples, states = measure(setup, args.repeats)
    setup.reset()
    engine_figures(setup, methods, states)
    del states
    verdicts = ratios(methods, runs)
    results.update(methods)
    results["load_average_after"] = os.getloadavg()
    ours, full = samples["ours_exact_undo"], samples["full_layer_fp32"]
    results["sample_max_abs_diff_ours_vs_full"] = float((ours.float() - full.float()).abs().max())
    results["sample_differing_elements"] = int((ours != full).sum())
    print_methods(setup, results, methods, load_before)
    print_ratios(verdicts)
    results["ratios"] = verdicts
    missed = any(v["wall_ours_over_copy_floor"] > 2 or v["extra_rss_mib"] > 64 or v["tensor_peak_mib"] > 64
                 or v["extra_rss_ours_over_full"] > 0.2 or v["wall_ours_over_full"] > 0.5 for v in verdicts.values())
    if missed or args.profile:
        for exact in (True, False):
            print(f"\nprofile of one merge (exact_undo={exact}): torch ops by self CPU time, then lora_ops functions")
            setup.reset()
            results[f"profile_exact_undo_{exact}"] = text = profile_merge(setup.weights, setup.lora, exact_undo=exact)
            print(text)
    from comfy_patch import run_comfy

    comfy = run_comfy(setup.shape, setup.lora_path, setup.tmp, ours, args.repeats)
    if comfy is not None:
        results["comfyui"] = comfy
        print_comfy(comfy, methods)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    setup.tmp_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
