"""The plan: every figure of one sampling run, its verdict and suggestion, as a dict or a table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..formats import UNMERGED_BYTES_PER_PARAM
from ..units import GIB, MIB
from .activations import ACTIVATION_FORMULA
from .inputs import PlanRequest
from .memory import CUDA_RESERVE_BYTES


@dataclass
class Plan:
    request: PlanRequest
    model: str
    params: int
    weights: dict[str, tuple[int, int]]  # dtype -> (elements, bytes)
    lora_label: str | None
    lora_params: int
    lora_resident_bytes: int
    activation_bytes: int
    activation_at: str
    activation_points: dict[str, int]
    image_tokens: int
    text_tokens: int
    effective_batch: int
    merge: dict[str, object] | None
    encoders: dict[str, int]
    card_bytes: int | None
    card_source: str
    notes: list[str] = field(default_factory=list)
    suggestion: list[str] | None = None
    suggestion_peak_bytes: int | None = None
    suggestion_fits: bool | None = None
    merge_shape: tuple[int, ...] = ()
    policy: str = "bf16"
    offload_bytes: int | None = None  # nothing fits: weights that must stay in system RAM (with the suggestion)
    resize_rank: int | None = None  # unmerged LoRA: the largest rank that fits as planned
    resize_peak_bytes: int | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(b for _, b in self.weights.values())

    @property
    def resident_bytes(self) -> int:
        return self.weight_bytes + sum(self.encoders.values())

    @property
    def sampling_bytes(self) -> int:
        return self.resident_bytes + self.lora_resident_bytes + self.activation_bytes

    @property
    def merge_peak_bytes(self) -> int:
        if self.merge is None or self.request.mode != "merged":
            return 0
        return self.resident_bytes + int(self.merge["ours_bytes"])

    @property
    def peak_bytes(self) -> int:
        return max(self.sampling_bytes, self.merge_peak_bytes)

    @property
    def usable_bytes(self) -> int | None:
        return None if self.card_bytes is None else self.card_bytes - CUDA_RESERVE_BYTES

    @property
    def fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.peak_bytes <= self.usable_bytes

    @property
    def verdict(self) -> str:
        return {True: "fits", False: "does not fit", None: "unknown (no card size)"}[self.fits]

    # --- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        return {
            "request": dataclasses.asdict(self.request),
            "model": self.model,
            "params": self.params,
            "weights": {k: {"params": n, "bytes": b} for k, (n, b) in self.weights.items()},
            "weights_bytes": self.weight_bytes,
            "lora": None
            if self.lora_label is None
            else {
                "label": self.lora_label,
                "params": self.lora_params,
                "resident_bytes": self.lora_resident_bytes,
                "bytes_per_param_unmerged": UNMERGED_BYTES_PER_PARAM,
            },
            "activations": {
                "bytes": self.activation_bytes,
                "at": self.activation_at,
                "points": self.activation_points,
                "image_tokens": self.image_tokens,
                "text_tokens": self.text_tokens,
                "effective_batch": self.effective_batch,
                "formula": ACTIVATION_FORMULA,
            },
            "merge_temporaries": self.merge,
            "encoders": self.encoders,
            "totals": {
                "resident_bytes": self.resident_bytes,
                "sampling_bytes": self.sampling_bytes,
                "merge_peak_bytes": self.merge_peak_bytes,
                "peak_bytes": self.peak_bytes,
            },
            "card": {
                "total_bytes": self.card_bytes,
                "usable_bytes": self.usable_bytes,
                "source": self.card_source,
                "reserve_bytes": CUDA_RESERVE_BYTES,
            },
            "verdict": self.verdict,
            "fits": self.fits,
            "suggestion": None
            if self.suggestion is None
            else {
                "changes": self.suggestion,
                "peak_bytes": self.suggestion_peak_bytes,
                "fits": self.suggestion_fits,
                "weights_offloaded_bytes": self.offload_bytes,
            },
            "resize": None
            if self.resize_rank is None
            else {"rank": self.resize_rank, "peak_bytes": self.resize_peak_bytes},
            "notes": self.notes,
        }

    def _table_rows(self) -> list[tuple[str, int]]:
        rows: list[tuple[str, int]] = []
        for label, (n, b) in sorted(self.weights.items(), key=lambda kv: -kv[1][1]):
            rows.append((f"weights {label} ({n / 1e9:.3f} B params)", b))
        if self.lora_label is not None:
            if self.request.mode == "unmerged":
                label = f"LoRA resident, unmerged ({self.lora_params / 1e6:.1f} M params x "
                label += f"{UNMERGED_BYTES_PER_PARAM} B)"
                rows.append((label, self.lora_resident_bytes))
            else:
                rows.append(("LoRA resident, merged (factors stay in system RAM)", 0))
        rows.append((f"activations (peak at {self.activation_at})", self.activation_bytes))
        rows += list(self.encoders.items())
        return rows

    def _merge_lines(self, width: int) -> list[str]:
        if self.merge is None:
            return []
        m = self.merge
        lines = [
            f"merge temporaries: lora_ops {int(m['ours_bytes']) / MIB:.0f} MiB (tile "
            f"{int(m['tile_bytes']) / MIB:.0f} MiB + fp32 LoRA factors {int(m['factors_bytes']) / MIB:.0f} MiB "
            f"+ rollback reserve {int(m['reserve_bytes']) / MIB:.0f} MiB) "
            f"vs full-layer fp32 at least {int(m['full_layer_bytes']) / MIB:.0f} MiB (fp32 copy + dense fp32 delta "
            f"of {m['full_layer_key']} {'x'.join(map(str, self.merge_shape))}; "
            f"{int(m['full_layer_comfy_bytes']) / MIB:.0f} MiB as ComfyUI computes it)"
        ]
        if self.request.mode == "merged":
            lines.append(f"{'merge peak (weights + merge temporaries)':{width}}{self.merge_peak_bytes / GIB:9.2f}")
        return lines

    def verdict_lines(self) -> list[str]:
        """The card, the verdict and the cheapest change that fits, one line each."""
        if self.card_bytes is None:
            return [f"verdict: {self.verdict}; pass a card size"]
        diff = (self.usable_bytes - self.peak_bytes) / GIB
        lines = [
            f"card {self.card_bytes / GIB:.2f} GiB ({self.card_source}), usable "
            f"{self.usable_bytes / GIB:.2f} GiB (minus {CUDA_RESERVE_BYTES / GIB:.1f} GiB CUDA context)",
            f"verdict: {self.verdict} ({'headroom' if diff >= 0 else 'over by'} {abs(diff):.2f} GiB)",
        ]
        if self.suggestion is not None:
            changes, peak = " + ".join(self.suggestion), self.suggestion_peak_bytes / GIB
            if self.suggestion_fits:
                lines.append(f"cheapest change that fits: {changes} -> {peak:.2f} GiB")
            else:
                lines.append(f"no listed change fits; with all of them ({changes}) the peak is {peak:.2f} GiB")
                lines.append(self._offload_line())
        if self.resize_rank is not None:
            source = self.request.loras[0] if len(self.request.loras) == 1 else "LORA.safetensors"
            lines.append(
                f"to keep the LoRA unmerged: resize it to rank {self.resize_rank} -> "
                f"{self.resize_peak_bytes / GIB:.2f} GiB (python -m lora_ops resize {source} --rank {self.resize_rank} "
                "--out SMALL.safetensors)"
            )
        return lines

    def _offload_line(self) -> str:
        if self.offload_bytes is None:
            return "it does not fit this card at all: the activations and one block's weights alone are too big"
        return (
            f"this card runs it only by offloading: {self.offload_bytes / GIB:.2f} GiB of the weights stay in system "
            "RAM and stream to the GPU every step (ComfyUI's lowvram / dynamic VRAM loading; slower)"
        )

    def format_table(self) -> str:
        r = self.request
        rows = self._table_rows()
        width = max(len(label) for label, _ in rows) + 2
        lines = [
            f"Flux plan: {self.model} ({self.params:,} params), weights {self.policy}, "
            f"{r.width}x{r.height}, batch {r.batch}, CFG {'on' if r.cfg else 'off'} -> "
            f"{self.effective_batch} x {self.image_tokens + self.text_tokens} tokens "
            f"({self.image_tokens} image + {self.text_tokens} text)",
        ]
        if self.lora_label is not None:
            lines.append(f"LoRA: {self.lora_label}, {r.mode}")
        lines.append(f"{'':{width}}{'GiB':>9}")
        lines += [f"{label:{width}}{b / GIB:9.2f}" for label, b in rows]
        lines.append(f"{'sampling peak':{width}}{self.sampling_bytes / GIB:9.2f}")
        lines += self._merge_lines(width)
        lines += self.verdict_lines()
        lines.append(f"activations model: {ACTIVATION_FORMULA}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
