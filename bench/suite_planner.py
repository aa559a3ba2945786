"""GPU suite, planner section: lora_ops.planner's prediction for each measurement the forward and merge sections
recorded (weights, resident LoRA, activations, total, merge temporaries); the target is within 10 %.
"""

from __future__ import annotations

from pathlib import Path

from suite_harness import Suite

from lora_ops.units import MIB


def compare_with_planner(suite: Suite, forwards: dict | None, merges: dict | None) -> dict:
    """Section "planner": one row per measurement; either input may be None (its section failed or was skipped)."""
    from lora_ops import planner
    from lora_ops.synthetic import write_flux_checkpoint

    if suite.shape != planner.PRESETS["flux-dev"]:  # the planner reads this shape from a checkpoint header
        model = str(write_flux_checkpoint(Path(suite.tmp.name) / "shape.safetensors", suite.shape))
    else:
        model = "flux-dev"
    common = dict(model=model, dtype="bf16", text_encoder="offload", clip="offload", vae="offload",
                  text_tokens=suite.text_tokens)
    rows = []

    def compare(what: str, predicted: int, measured: int) -> None:
        err = predicted / measured - 1 if measured else float("nan")
        rows.append({"what": what, "predicted_bytes": predicted, "measured_bytes": measured, "error": err,
                     "within_10pct": abs(err) <= 0.10})
        suite.say(f"  {what:48} predicted {predicted / MIB:10.1f} MiB  measured {measured / MIB:10.1f} MiB  "
                  f"{100 * err:+6.1f} %  {'ok' if abs(err) <= 0.10 else 'OFF BY > 10 %'}")

    suite.say("planner vs measurement:")
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
            modes = ("exact_undo", "no_journal") if suite.device.type == "cpu" else ("exact_undo_tile_64mib",)
            for mode in modes:
                if mode in m:
                    measured = int(m[mode]["median_extra_bytes"])
                    label = f"merge r{rank} {mode}: extra (tile + fp32 factors)"
                    if suite.device.type == "cpu" and "exact_undo" in m:
                        # on the CPU the journal (system RAM; held during every call) is in the same pool
                        measured -= int(m["exact_undo"]["runs"][0]["journal_bytes"])
                        label += ", minus journal"
                    compare(label, int(p.merge["ours_bytes"]), measured)
    return {"rows": rows, "all_within_10pct": all(r["within_10pct"] for r in rows)}
