"""Streamed rewrites of a Flux checkpoint (+ LoRAs): one writer for every output dtype, fp8 included.

Each source tensor is read through the validated reader, converted, and written at once, so peak memory is
a few tensors whatever the model size. Reading, converting and writing overlap (a reader thread reads the
next tensor and a writer thread writes the previous one while the merge runs; file I/O and torch's kernels
release the GIL). `StreamingWriter` writes a temporary file and renames it only when everything succeeded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from .adapters import DoRA
from .errors import LoRAOpsError, is_out_of_memory
from .flux import strip_model_prefix
from .formats import LoRAFile, check_fits
from .merge import MergeOptions, merge_loras, terms_by_target
from .model_files import open_flux_checkpoint, refuse_overwriting_inputs
from .rows import DEFAULT_TILE_BYTES, Term, add_terms, tile_rows_for, tiles
from .safetensors_io import SafetensorsFile, StreamingWriter

OUTPUT_DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

PlanEntry = tuple[str, torch.dtype, tuple[int, ...]]
Outputs = list[tuple[str, torch.Tensor]]


class Conversion(Protocol):
    """What a streamed rewrite does: the output layout, and the output tensors of each source tensor."""

    def plan(self) -> list[PlanEntry]:
        """(key, dtype, shape) of every output tensor, in writing order."""

    def leading(self) -> Outputs:
        """Output tensors written before the first source tensor's (e.g. a format marker)."""

    def sources(self) -> list[str]:
        """Source keys to read, in order; their outputs follow the leading ones in `plan()` order."""

    def convert(self, key: str, tensor: torch.Tensor, get: Callable[[str], torch.Tensor]) -> Outputs:
        """The output tensors of one source tensor (`get` reads another source key, e.g. its scale)."""


def open_for_rewrite(
    model_path: str | Path, loras: Sequence[tuple[LoRAFile, float]], out_path: Path
) -> SafetensorsFile:
    """Checks every rewrite makes before anything is written, then the validated checkpoint."""
    refuse_overwriting_inputs(out_path, [Path(model_path), *(lora.path for lora, _ in loras)])
    for lora, strength in loras:
        if not math.isfinite(strength):
            raise LoRAOpsError(f"{lora.path}: strength {strength} is not a finite number; give one such as 0.8")
    return open_flux_checkpoint(model_path)


def merged_stack_metadata(loras: Sequence[tuple[LoRAFile, float]]) -> str:
    """The `lora_ops.merged` header entry of a merged file: each LoRA, its strength and its block spec."""
    return json.dumps(
        [
            {"file": lora.path.name, "format": lora.format, "strength": s}
            | ({"blocks": lora.block_spec} if lora.block_spec else {})
            for lora, s in loras
        ]
    )


def write_converted(
    model: SafetensorsFile,
    conversion: Conversion,
    out_path: str | Path,
    metadata: dict[str, str],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Stream `model` through `conversion` into `out_path`; on any error nothing is left behind.

    At most three source tensors are alive: the next one being read, the current one being converted,
    and the previous one's outputs being written. Writes happen in order, one at a time.
    """
    sources = conversion.sources()
    with (
        StreamingWriter(out_path, conversion.plan(), metadata) as writer,
        ThreadPoolExecutor(1, "lora_ops-read") as reader,
        ThreadPoolExecutor(1, "lora_ops-write") as writing,
    ):

        def write_all(outputs: Outputs) -> None:
            for key, tensor in outputs:
                writer.write(key, tensor)

        pending: Future = writing.submit(write_all, conversion.leading())
        ahead = reader.submit(model.get, sources[0]) if sources else None
        try:
            for i, key in enumerate(sources):
                tensor = ahead.result()
                ahead = reader.submit(model.get, sources[i + 1]) if i + 1 < len(sources) else None
                outputs = conversion.convert(key, tensor, model.get)
                del tensor
                pending.result()
                pending = writing.submit(write_all, outputs)
                del outputs
                if progress is not None:
                    progress(i + 1, len(sources))
            pending.result()
        except BaseException:
            for future in (ahead, pending):
                if future is not None:
                    future.cancel()
            raise


def _finite(tensor: torch.Tensor) -> bool:
    """True unless `tensor` holds a NaN or ±Inf (aminmax propagates both; ~15× cheaper than isfinite().all())."""
    if tensor.numel() == 0 or not tensor.dtype.is_floating_point:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


class _CopyMerge:
    """Fresh merges of single weights into copies, with the engine's arithmetic and none of its undo machinery.

    `merge_loras` changes live weights, so it keeps a rollback journal as it goes; a copy that the writer throws
    away on failure needs none, which halves the time per weight. Per tile: base = the stored rows in fp32,
    delta = Σ coeff·ΔW summed in fp32 from zero by the row kernel (`rows.add_terms`; adapters compute in fixed
    row blocks, so tiles do not change the bits), out = base + delta rounded once: what `merge_loras` writes,
    bit for bit (the tests compare the two). Two fp32 buffers serve every tile of every weight. Per-column DoRA,
    whose norms need a pass over the whole weight first, goes through the engine (`DtypeConversion`).
    """

    def __init__(self, options: MergeOptions) -> None:
        self.options = options
        self.buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _buffer(self, name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get((name, device))
        if buf is None or buf.numel() < rows * cols:
            self.buffers[(name, device)] = buf = torch.empty(rows * cols, dtype=torch.float32, device=device)
        return buf[: rows * cols].view(rows, cols)

    def merged(
        self, key: str, tensor: torch.Tensor, terms: list[Term], want: torch.dtype, read: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """`tensor` + Σ terms stored in `want`; on out-of-memory, retried from `read()` with half the tile."""
        budget = self.options.tile_bytes or DEFAULT_TILE_BYTES
        while True:
            out = tensor if tensor.dtype == want else torch.empty(tensor.shape, dtype=want)
            try:
                self._merge_tiles(key, tensor, terms, out, budget)
                return out
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
                if not is_out_of_memory(error) or budget // 2 < self.options.min_tile_bytes:
                    raise
                budget //= 2
                self.buffers.clear()
                tensor = read()

    def _merge_tiles(self, key: str, source: torch.Tensor, terms: list[Term], out: torch.Tensor, budget: int) -> None:
        device = torch.device(self.options.compute_device) if self.options.compute_device else source.device
        on_device = [(a.on(device), coeff) for a, coeff in terms]
        src = source if source.dim() == 2 else source.reshape(source.shape[0], -1)
        dst = out if out.dim() == 2 else out.reshape(out.shape[0], -1)
        rows, cols = src.shape
        for i, (r0, r1) in enumerate(tiles(rows, tile_rows_for(cols, budget, len(on_device)))):
            if self.options.on_tile is not None:
                self.options.on_tile(key, i, r1 - r0)
            base = self._buffer("base", r1 - r0, cols, device)
            base.copy_(src[r0:r1])
            delta = self._buffer("delta", r1 - r0, cols, device)
            delta.zero_()
            add_terms(delta, on_device, r0, r1, base)
            dst[r0:r1].copy_(torch.add(base, delta, out=base))


class DtypeConversion:
    """The checkpoint with the LoRAs merged, every float tensor stored in `out_dtype` (None: as stored)."""

    def __init__(
        self,
        model: SafetensorsFile,
        loras: Sequence[tuple[LoRAFile, float]],
        out_dtype: torch.dtype | None,
        device: str | None = None,
    ) -> None:
        self.model = model
        self.loras = list(loras)
        self.out_dtype = out_dtype
        self.terms = terms_by_target(self.loras)
        self.targets = {t for lora, _ in loras for t in lora.targets}
        self.options = MergeOptions(exact_undo=False, compute_device=device)
        self.copies = _CopyMerge(self.options)

    def stored_dtype(self, key: str) -> torch.dtype:
        own = self.model.dtype(key)
        return self.out_dtype if (self.out_dtype is not None and own.is_floating_point) else own

    def plan(self) -> list[PlanEntry]:
        return [(key, self.stored_dtype(key), self.model.shape(key)) for key in self.model.keys()]

    def leading(self) -> Outputs:
        return []

    def sources(self) -> list[str]:
        return self.model.keys()

    def convert(self, key: str, tensor: torch.Tensor, get: Callable[[str], torch.Tensor]) -> Outputs:
        want = self.stored_dtype(key)
        name = strip_model_prefix(key)[1]
        if not self.terms.get(name):
            return [(key, tensor.to(want))]
        terms = self.terms[name]
        if any(isinstance(a, DoRA) and a.per_column for a, _ in terms):
            work = tensor.float() if want != tensor.dtype else tensor  # the engine changes this fresh copy in place
            merge_loras({name: work}, [(lora.only({name}), s) for lora, s in self.loras], options=self.options)
            merged = work.to(want)
        else:
            merged = self.copies.merged(key, tensor, terms, want, lambda: get(key))
        if not _finite(merged) and _finite(get(key)):
            stack = ", ".join(f"{lora.path}:{s:g}" for lora, s in self.loras)
            raise LoRAOpsError(
                f"{self.model.path}: merging {stack} makes {key!r} overflow to Inf/NaN in {want}; nothing was "
                "written. Lower the strengths, or write a wider dtype (--dtype fp32)."
            )
        return [(key, merged)]


def merge_checkpoint(
    model_path: str | Path,
    loras: Sequence[tuple[LoRAFile, float]],
    out_path: str | Path,
    *,
    dtype: str = "keep",
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Write `out_path` = the checkpoint with the LoRAs merged; returns a summary for the caller."""
    out_path = Path(out_path)
    if dtype not in OUTPUT_DTYPES:
        raise LoRAOpsError(f"unknown --dtype {dtype!r}; choose one of {', '.join(OUTPUT_DTYPES)} (or fp8)")
    model = open_for_rewrite(model_path, loras, out_path)
    shapes = {strip_model_prefix(k)[1]: model.shape(k) for k in model.keys()}
    for lora, _ in loras:
        check_fits(lora, shapes.get, model_name=str(model_path))
    conversion = DtypeConversion(model, loras, OUTPUT_DTYPES[dtype], device)
    metadata = dict(model.metadata)
    metadata["lora_ops.merged"] = merged_stack_metadata(loras)
    if dtype != "keep":
        metadata["lora_ops.dtype"] = dtype
    write_converted(model, conversion, out_path, metadata, progress)
    merged = sum(1 for k in model.keys() if strip_model_prefix(k)[1] in conversion.targets)
    return {"out": str(out_path), "tensors": len(model.keys()), "merged": merged, "dtype": dtype}
