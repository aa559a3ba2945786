"""Which Flux weights should stay bf16 under fp8? Output error per byte saved, group by group (CPU).

    PYTHONPATH=. python bench/fp8_policy_error.py [--models flux2-dev,flux1-dev] [--seeds 2] [--json out.json]

For each model, a Flux forward (bench/flux_forward.py's BFL-structured Flux, which also runs Flux.2's
shared modulation and gated MLP) with the model's real block counts at a reduced width (256, 2 heads of
128; the fp8 rounding error of a weight is relative, so the width changes little), random weights from
lora_ops.synthetic scaled to unit gain (std 1/sqrt(fan_in)), 256 image + 64 text tokens, computed in fp32.
Reference: the bf16 weights. Then, one group of Linear weights at a time is quantised to scaled fp8
(lora_ops.fp8.quantize, as the writer stores it) and dequantised; error = ‖y − y_ref‖ / ‖y_ref‖.
Independent rounding errors add in energy, so the figure of merit is error² per GiB saved on the real
model (1 byte per parameter, minus the 4-byte scale). Groups far above the blocks' figure are the ones a
policy keeps in bf16. Finally each fp8 preset as a whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
from flux_forward import Flux, make_inputs

from lora_ops import GIB, fp8
from lora_ops.flux import VARIANTS, FluxShape, flux_weight_shapes, is_modulation
from lora_ops.synthetic import flux_state_dict

#: Weight groups by name: (label, test on the BFL name of a `.weight`).
GROUPS = (
    ("img_in", lambda n: n.startswith("img_in.")),
    ("txt_in", lambda n: n.startswith("txt_in.")),
    ("time / guidance / vector embedders", lambda n: n.startswith(("time_in.", "guidance_in.", "vector_in."))),
    ("modulation (per block, or Flux.2's shared)", is_modulation),
    ("double blocks: attention qkv + proj", lambda n: n.startswith("double_blocks.") and "_attn." in n),
    ("double blocks: MLP", lambda n: n.startswith("double_blocks.") and "_mlp." in n),
    ("single blocks: linear1", lambda n: n.startswith("single_blocks.") and ".linear1." in n),
    ("single blocks: linear2", lambda n: n.startswith("single_blocks.") and ".linear2." in n),
    ("final_layer.linear", lambda n: n.startswith("final_layer.linear.")),
    ("final_layer.adaLN_modulation", lambda n: n.startswith("final_layer.adaLN_modulation.")),
)


def reduced(shape: FluxShape) -> FluxShape:
    return dataclasses.replace(shape, hidden=256, heads=2, context_dim=512)


def linear_weights(shape: FluxShape) -> dict[str, tuple[int, ...]]:
    return {n: d for n, d in flux_weight_shapes(shape).items() if n.endswith(".weight") and len(d) == 2}


def saved_bytes(real: FluxShape, names: list[str]) -> int:
    dims = flux_weight_shapes(real)
    return sum(math.prod(dims[n]) - 4 for n in names)


def forward(shape: FluxShape, weights: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    inputs = [t.float() if t.is_floating_point() else t for t in make_inputs(shape, 256, 256, 1, 64, "cpu")]
    gen = torch.Generator().manual_seed(seed)
    inputs[0] = torch.randn(inputs[0].shape, generator=gen)
    with torch.no_grad():
        return Flux(weights, shape).forward(*inputs)


def unit_gain(name: str, value: torch.Tensor) -> torch.Tensor:
    """Scale a synthetic Linear weight to std 1/sqrt(fan_in): activations, modulations and gates keep order 1
    through the depth, as in a trained model (the synthetic 0.02 would make every block's update vanish)."""
    if name.endswith(".weight") and value.dim() == 2:
        return value * (value.shape[1] ** -0.5 / 0.02)
    return value


def quantised(weights: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out = dict(weights)
    for name in names:
        q, s = fp8.quantize(weights[name])
        out[name] = fp8.dequantize(q, s).float()
    return out


def errors_for_seed(small: FluxShape, seed: int) -> dict[str, float]:
    """Relative output error with each group, and each preset, in fp8 (all else bf16)."""
    names = list(linear_weights(small))
    weights = {k: unit_gain(k, v.float()) for k, v in flux_state_dict(small, seed=seed).items()}
    ref = forward(small, weights, seed)
    out = {}
    selections = {label: [n for n in names if test(n)] for label, test in GROUPS}
    dims = flux_weight_shapes(small)
    for preset in fp8.PRESETS:
        selections[f"preset {preset}"] = [n for n in names if fp8.get_policy(preset).selects(n, dims[n])]
    for label, selected in selections.items():
        if selected:
            y = forward(small, quantised(weights, selected), seed)
            out[label] = float((y - ref).norm()) / float(ref.norm())
    return out


def measure(model: str, seeds: int) -> dict[str, dict]:
    real = VARIANTS[model]
    small = reduced(real)
    names = list(linear_weights(small))
    runs = [errors_for_seed(small, seed) for seed in range(seeds)]
    tests = {label: test for label, test in GROUPS}
    dims = flux_weight_shapes(small)
    rows = {}
    for label in runs[0]:
        if label.startswith("preset "):
            selected = [n for n in names if fp8.get_policy(label.split()[1]).selects(n, dims[n])]
        else:
            selected = [n for n in names if tests[label](n)]
        error = math.sqrt(sum(run[label] ** 2 for run in runs) / len(runs))
        saved = saved_bytes(real, selected) / GIB
        rows[label] = {
            "weights": len(selected),
            "saved_gib": saved,
            "error": error,
            "error2_per_gib": error**2 / saved if saved > 0 else float("inf"),
        }
    return rows


def report(model: str, rows: dict[str, dict]) -> None:
    print(f"\n{model} (real-size bytes; error measured at width 256 with the real block counts)")
    print(f"  {'group':48}{'saved GiB':>10}{'error %':>10}{'error² per GiB':>16}")
    groups = sorted(
        (kv for kv in rows.items() if not kv[0].startswith("preset ")), key=lambda kv: -kv[1]["error2_per_gib"]
    )
    presets = [kv for kv in rows.items() if kv[0].startswith("preset ")]
    for label, row in [*groups, *presets]:
        print(f"  {label:48}{row['saved_gib']:10.3f}{100 * row['error']:10.3f}{row['error2_per_gib']:16.3e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="flux2-dev,flux2-klein-4b,flux1-dev")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for model in args.models.split(","):
        results[model] = measure(model, args.seeds)
        report(model, results[model])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
