"""Shrinking a LoRA: the optimal low-rank approximation of each layer's change, in the file's own format.

A LoRA too big to apply unmerged can often lose most of its rank for a small error. For every
layer the change ΔW is replaced by its truncated SVD (Eckart–Young: the best approximation of that
rank). LoRA factors never become a full-size matrix: with up = Qu·Ru and downᵀ = Qd·Rd (thin QR),
ΔW = Qu·(Ru·Rdᵀ)·Qdᵀ, so only the small r×r core is decomposed. LoKr, LoHa and full diffs are
decomposed from their dense ΔW in fp32, one layer at a time.

The output keeps the input's key names and naming scheme: LoRA layers keep their keys (alpha is
set so alpha/rank keeps its value); LoKr/LoHa/diff layers become `lora_down`/`lora_up`/`alpha`
under the same module name. DoRA layers, bias diffs, replaced weights and text-encoder keys are
copied as they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import Adapter, BiasDiff
from .errors import LoRAOpsError
from .formats import UNMERGED_BYTES_PER_PARAM, LoRAFile, load_lora
from .formats.factor_keys import SUFFIXES, split_key
from .model_files import refuse_overwriting_inputs
from .safetensors_io import SafetensorsFile, StreamingWriter
from .units import MIB


@dataclass(frozen=True)
class LayerResize:
    """What resizing did to one layer of the file."""

    module: str
    kind: str
    old_rank: int | None
    new_rank: int | None
    relative_error: float  # ‖ΔW − ΔW_new‖_F / ‖ΔW‖_F of the factors as written
    saved_bytes: int  # GPU memory saved when applied unmerged (UNMERGED_BYTES_PER_PARAM per factor element)


@dataclass
class ResizeReport:
    out: Path
    layers: list[LayerResize] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return sum(layer.saved_bytes for layer in self.layers)

    def format_table(self) -> str:
        lines = [f"{'layer':<60} {'kind':<5} {'rank':>11} {'rel. error':>10} {'saved MiB':>9}"]
        for layer in self.layers:
            ranks = f"{layer.old_rank or '-'} -> {layer.new_rank or '-'}"
            lines.append(
                f"{layer.module[:60]:<60} {layer.kind:<5} {ranks:>11} {layer.relative_error:>10.4f} "
                f"{layer.saved_bytes / MIB:>9.2f}"
            )
        worst = max((layer.relative_error for layer in self.layers), default=0.0)
        lines.append(
            f"wrote {self.out}: {len(self.layers)} layers, worst relative error {worst:.4f}, "
            f"{self.saved_bytes / MIB:.1f} MiB less GPU memory when applied unmerged"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _keep(sigma: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep: a fixed rank, or the fewest holding `energy` of Σσ²."""
    if rank is not None:
        return max(1, min(rank, sigma.numel()))
    share = torch.cumsum(sigma.double().square(), 0)
    total = float(share[-1])
    if total == 0.0:
        return 1
    return max(1, min(int(torch.searchsorted(share, energy * total * (1 - 1e-12)).item()) + 1, sigma.numel()))


def _split_sqrt(u: torch.Tensor, sigma: torch.Tensor, vt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (U_k·√Σ_k, √Σ_k·V_kᵀ): balanced magnitudes, so neither factor loses precision."""
    root = sigma[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vt[:k]


def low_rank_factors(
    up: torch.Tensor, down: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k (up', down') for up @ down, from thin QRs and the SVD of the r×r core (float64, small)."""
    qu, ru = torch.linalg.qr(up.double())
    qd, rd = torch.linalg.qr(down.double().t())
    u, sigma, vt = torch.linalg.svd(ru @ rd.t())
    k = _keep(sigma, rank, energy)
    new_up, new_down = _split_sqrt(qu @ u, sigma, vt @ qd.t(), k)
    return new_up, new_down


def dense_low_rank(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k (up, down) for a dense change (fp32 SVD of one layer)."""
    u, sigma, vt = torch.linalg.svd(delta.float(), full_matrices=False)
    return _split_sqrt(u, sigma, vt, _keep(sigma, rank, energy))


def _lowrank_error(up: torch.Tensor, down: torch.Tensor, new_up: torch.Tensor, new_down: torch.Tensor) -> float:
    """‖up·down − new_up·new_down‖_F / ‖up·down‖_F from r×k products only (no full-size matrix)."""
    up, down, new_up, new_down = (t.double() for t in (up, down, new_up, new_down))

    def inner(a_up, a_down, b_up, b_down) -> float:
        return float(((a_up.t() @ b_up) * (a_down @ b_down.t())).sum())

    old = inner(up, down, up, down)
    diff = old + inner(new_up, new_down, new_up, new_down) - 2 * inner(up, down, new_up, new_down)
    return math.sqrt(max(diff, 0.0) / old) if old > 0 else 0.0


def _dense_delta(adapter: Adapter) -> torch.Tensor:
    """The change of one adapter, scale included, in the file's own row order (fp32)."""
    rows, cols = adapter.shape
    out = torch.zeros(rows, cols)
    adapter.on("cpu").add_delta(out, 0, rows, 1.0)
    return out


def _units(lora: LoRAFile) -> dict[tuple[str, ...], list[Adapter]]:
    """The file's layers: adapters grouped by the keys they came from (a kohya split_qkv layer gives several)."""
    out: dict[tuple[str, ...], list[Adapter]] = {}
    for adapters in lora.targets.values():
        for a in adapters:
            out.setdefault(tuple(a.source_keys), []).append(a)
    return out


def unmerged_saving(lora: LoRAFile, rank: int) -> int:
    """GPU bytes saved, when the LoRA is applied unmerged, by resizing it to `rank` (for the planner)."""
    saved = 0
    for adapters in _units(lora).values():
        kind = adapters[0].kind
        if kind not in ("lora", "lokr", "loha", "diff") or adapters[0].shape[1] == 1:
            continue
        params = sum(t.numel() for a in adapters for t in a.factors().values())
        rows = sum(a.shape[0] for a in adapters)
        saved += max(0, params - (rows + adapters[0].shape[1]) * rank)
    return saved * UNMERGED_BYTES_PER_PARAM


def _by_family(keys: tuple[str, ...], raw: dict[str, torch.Tensor]) -> dict[str, str]:
    """factor name (down, up, w1, diff, ..., and the module's alpha) → key, for the weight factors of one module."""
    out = {}
    for key in keys:
        split = split_key(key)
        if split is not None and split[1] in SUFFIXES and SUFFIXES[split[1]][0] is not BiasDiff:
            out[SUFFIXES[split[1]][1]] = key
            if f"{split[0]}.alpha" in raw:
                out["alpha"] = f"{split[0]}.alpha"
    return out


def _resize_lora(keys, adapters, raw, rank, energy) -> tuple[dict[str, torch.Tensor], LayerResize] | None:
    """Same keys, fewer rows/columns; alpha keeps alpha/rank (the loader's scale) unchanged."""
    names = _by_family(keys, raw)
    up, down = raw[names["up"]], raw[names["down"]]
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    old_rank = down2.shape[0]
    if {a.scale for a in adapters} != {adapters[0].scale}:
        raise LoRAOpsError(f"{names['down']}: its parts have different scales; this layer cannot be resized")
    new_up, new_down = low_rank_factors(up2, down2, rank, energy)
    k = new_up.shape[1]
    if k >= old_rank:
        return None
    new_up, new_down = new_up.to(up.dtype), new_down.to(down.dtype)
    out = {names["down"]: new_down, names["up"]: new_up}
    if "alpha" in names:
        alpha = raw[names["alpha"]]
        out[names["alpha"]] = torch.full(alpha.shape, adapters[0].scale * k, dtype=alpha.dtype)
    rows, cols = up2.shape[0], down2.shape[1]
    saved = (rows + cols) * (old_rank - k) * UNMERGED_BYTES_PER_PARAM
    error = _lowrank_error(up2, down2, new_up, new_down)
    return out, LayerResize(split_key(names["down"])[0], "lora", old_rank, k, error, saved)


def _resize_dense(keys, adapter, raw, rank, energy) -> tuple[dict[str, torch.Tensor], LayerResize] | None:
    """LoKr / LoHa / full diff → a LoRA of the same module name (scale 1: alpha = rank)."""
    names = _by_family(keys, raw)
    first_key = next(k for n, k in names.items() if n != "alpha")
    first = raw[first_key]
    delta = raw[names["diff"]].float() if adapter.kind == "diff" else _dense_delta(adapter)
    delta = delta.reshape(delta.shape[0], -1)
    up, down = dense_low_rank(delta, rank, energy)
    k = up.shape[1]
    params = sum(raw[key].numel() for name, key in names.items() if name != "alpha")
    if (delta.shape[0] + delta.shape[1]) * k >= params:
        return None
    up, down = up.to(first.dtype), down.to(first.dtype)
    error = float(torch.linalg.matrix_norm(delta - up.float() @ down.float()) / torch.linalg.matrix_norm(delta))
    module = split_key(first_key)[0]
    alpha = torch.tensor(float(k))  # scale alpha/rank = 1: the factors carry the whole change
    out = {f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up, f"{module}.alpha": alpha}
    saved = (params - (delta.shape[0] + delta.shape[1]) * k) * UNMERGED_BYTES_PER_PARAM
    return out, LayerResize(module, adapter.kind, getattr(adapter, "rank", None), k, error, saved)


def _check_request(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise LoRAOpsError("resize needs exactly one of --rank N or --energy F (e.g. --rank 16 or --energy 0.99)")
    if rank is not None and rank < 1:
        raise LoRAOpsError(f"--rank {rank}: the rank must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise LoRAOpsError(f"--energy {energy}: give the share of singular-value energy to keep, in (0, 1]")


def _refuse_rank_dependent_alpha(lora: LoRAFile) -> None:
    """PEFT `alpha_pattern` ties the scale to the rank of the file; a new rank would change the LoRA's strength."""
    config = json.loads(lora.metadata.get("lora_adapter_metadata") or "{}")
    if config.get("alpha_pattern"):
        raise LoRAOpsError(
            f"{lora.path}: its PEFT metadata sets per-layer alphas (alpha_pattern), which fix the scale to the "
            "current rank; resizing would change the LoRA's strength. Convert it to kohya format first."
        )


def _resized_layers(lora: LoRAFile, raw: dict[str, torch.Tensor], rank, energy, report: ResizeReport):
    """key of the file → its new tensors (the first key of a layer carries them, the others map to {})."""
    changes: dict[str, dict[str, torch.Tensor]] = {}
    for keys, adapters in _units(lora).items():
        weights = [a for a in adapters if a.shape[1] > 1]
        kind = weights[0].kind if weights else None
        if kind == "lora":
            result = _resize_lora(keys, weights, raw, rank, energy)
        elif kind in ("lokr", "loha", "diff"):
            result = _resize_dense(keys, weights[0], raw, rank, energy)
        else:
            if kind is not None:
                report.notes.append(f"{keys[0]}: {kind} layer kept as it is")
            continue
        if result is None:
            continue
        new, layer = result
        replaced = sorted(_by_family(keys, raw).values(), key=list(raw).index)
        for key in replaced:
            changes[key] = {}
        changes[replaced[0]] = new
        report.layers.append(layer)
    return changes


def resize_lora(
    path: str | Path, out: str | Path, *, rank: int | None = None, energy: float | None = None
) -> ResizeReport:
    """Write `out` = the LoRA at `path` with each layer's change cut to `rank` (or to `energy` of it).

    Layers already at or below the rank are copied unchanged. Nothing is written if anything fails.
    """
    _check_request(rank, energy)
    out = Path(out)
    refuse_overwriting_inputs(out, [Path(path)])
    lora = load_lora(path)
    _refuse_rank_dependent_alpha(lora)
    source = SafetensorsFile(path)
    raw = dict(source.iter_tensors())
    report = ResizeReport(out)
    changes = _resized_layers(lora, raw, rank, energy, report)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key in changes:
            tensors.update(changes[key])
        else:
            tensors[key] = tensor
    metadata = dict(source.metadata)
    metadata["lora_ops.resized"] = json.dumps({"rank": rank, "energy": energy, "source": Path(path).name})
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with StreamingWriter(out, plan, metadata) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
    return report
