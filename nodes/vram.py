"""VRAM / RAM report: figures from torch, ComfyUI's model manager and psutil; text and a bar chart."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import comfy.model_management
import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw, ImageFont

from ..lora_ops import GIB
from .runtime import describe_model_state


@dataclass
class LoadedModelInfo:
    name: str
    device: str
    loaded: int
    size: int
    note: str = ""


@dataclass
class Snapshot:
    device: str
    has_gpu: bool
    gpu_total: int = 0
    gpu_free: int = 0
    allocated: int | None = None
    reserved: int | None = None
    peak: int | None = None
    models: list[LoadedModelInfo] = field(default_factory=list)
    rss: int = 0
    ram_total: int = 0
    ram_available: int = 0


def _loaded_models() -> list[LoadedModelInfo]:
    out = []
    for loaded in list(comfy.model_management.current_loaded_models):
        patcher = loaded.model
        if patcher is None:
            continue
        base = patcher.model
        note = describe_model_state(base) if hasattr(base, "diffusion_model") else ""
        out.append(
            LoadedModelInfo(
                type(base).__name__, str(loaded.device), int(patcher.loaded_size()), int(patcher.model_size()), note
            )
        )
    return out


def take_snapshot(reset_peak: bool = True) -> Snapshot:
    """Read every figure now; with `reset_peak`, the next report's peak starts from here."""
    device = comfy.model_management.get_torch_device()
    snap = Snapshot(device=str(device), has_gpu=getattr(device, "type", "cpu") != "cpu")
    if snap.has_gpu:
        snap.device = comfy.model_management.get_torch_device_name(device)
        snap.gpu_total = int(comfy.model_management.get_total_memory(device))
        snap.gpu_free = int(comfy.model_management.get_free_memory(device))
        if device.type == "cuda" and torch.cuda.is_available():
            snap.gpu_free, snap.gpu_total = (int(x) for x in torch.cuda.mem_get_info(device))
            snap.allocated = int(torch.cuda.memory_allocated(device))
            snap.reserved = int(torch.cuda.memory_reserved(device))
            snap.peak = int(torch.cuda.max_memory_allocated(device))
            if reset_peak:
                torch.cuda.reset_peak_memory_stats(device)
    snap.models = _loaded_models()
    snap.rss = int(psutil.Process().memory_info().rss)
    vm = psutil.virtual_memory()
    snap.ram_total, snap.ram_available = int(vm.total), int(vm.available)
    return snap


def _g(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


def format_report(snap: Snapshot, label: str = "") -> str:
    lines = [f"VRAM report{': ' + label if label else ''}"]
    if snap.has_gpu:
        lines.append(f"GPU {snap.device}: total {_g(snap.gpu_total)}, free {_g(snap.gpu_free)}")
        if snap.allocated is not None:
            lines.append(
                f"  torch allocated {_g(snap.allocated)}, reserved {_g(snap.reserved)}, "
                f"peak allocated since last report {_g(snap.peak)}"
            )
    else:
        lines.append(f"No GPU: ComfyUI runs on {snap.device}; models live in system RAM.")
    if snap.models:
        lines.append("Loaded models (ComfyUI model manager):")
        for m in snap.models:
            extra = f" [{m.note}]" if m.note else ""
            lines.append(f"  {m.name} on {m.device}: {_g(m.loaded)} loaded of {_g(m.size)}{extra}")
    else:
        lines.append("Loaded models: none")
    lines.append(
        f"Process RSS {_g(snap.rss)}; system RAM total {_g(snap.ram_total)}, available {_g(snap.ram_available)}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- chart

_PALETTE = [(66, 133, 244), (52, 168, 83), (251, 188, 5), (171, 71, 188), (0, 172, 193), (255, 112, 67)]
_GREY = (140, 140, 140)
_LIGHT = (225, 225, 225)
_DARK = (90, 90, 90)


def _bars(snap: Snapshot) -> list[tuple[str, int, list[tuple[str, int, tuple[int, int, int]]]]]:
    """[(title, total, [(label, bytes, colour), ...])] in drawing order."""
    bars = []
    colours = iter(_PALETTE * 4)
    if snap.has_gpu:
        on_gpu = [m for m in snap.models if m.device != "cpu"]
        segs = [(f"{m.name} (loaded)", m.loaded, next(colours)) for m in on_gpu]
        if snap.allocated is not None:
            segs.append(("other torch tensors", max(snap.allocated - sum(m.loaded for m in on_gpu), 0), _DARK))
            segs.append(("reserved, unused", max((snap.reserved or 0) - snap.allocated, 0), _GREY))
            used_outside = snap.gpu_total - snap.gpu_free - (snap.reserved or 0)
            segs.append(("outside torch (context, others)", max(used_outside, 0), (200, 120, 120)))
        segs.append(("free", snap.gpu_free, _LIGHT))
        bars.append((f"GPU {snap.device}", snap.gpu_total, segs))
    on_cpu = [m for m in snap.models if m.device == "cpu"]
    segs = [(f"{m.name} weights", m.loaded, next(colours)) for m in on_cpu]
    segs.append(("rest of this process", max(snap.rss - sum(m.loaded for m in on_cpu), 0), _DARK))
    segs.append(("other processes / cache", max(snap.ram_total - snap.ram_available - snap.rss, 0), _GREY))
    segs.append(("available", snap.ram_available, _LIGHT))
    bars.append(("System RAM", snap.ram_total, segs))
    return bars


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_chart(snap: Snapshot, label: str = "", width: int = 768) -> torch.Tensor:
    """A stacked bar per memory pool, as an IMAGE tensor [1, H, W, 3] with values in 0..1."""
    bars = _bars(snap)
    font, small = _font(16), _font(13)
    pad, bar_h, line_h = 16, 28, 18
    height = pad + 24
    for title, _, segs in bars:
        legend = len(segs) + (1 if title.startswith("GPU") and snap.peak is not None else 0)
        height += line_h + bar_h + 8 + line_h * math.ceil(legend / 2) + pad
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((pad, pad), "Where the memory goes" + (f": {label}" if label else ""), fill=(0, 0, 0), font=font)
    y = pad + 24
    inner = width - 2 * pad
    for title, total, segs in bars:
        d.text((pad, y), f"{title}: {_g(total)}", fill=(0, 0, 0), font=small)
        y += line_h
        x = float(pad)
        scale = inner / max(total, sum(s for _, s, _ in segs), 1)
        for _, size, colour in segs:
            w = size * scale
            if w >= 0.5:
                d.rectangle([int(x), y, int(x + w), y + bar_h], fill=colour)
            x += w
        d.rectangle([pad, y, pad + inner, y + bar_h], outline=(0, 0, 0))
        if title.startswith("GPU") and snap.peak is not None:
            px = pad + int(snap.peak * scale)
            d.line([px, y - 4, px, y + bar_h + 4], fill=(220, 0, 0), width=2)
            segs = [*segs, (f"peak allocated {_g(snap.peak)}", 0, (220, 0, 0))]
        y += bar_h + 8
        for i, (name, size, colour) in enumerate(segs):
            col, row = i % 2, i // 2
            lx, ly = pad + col * (inner // 2), y + row * line_h
            d.rectangle([lx, ly + 3, lx + 12, ly + 15], fill=colour, outline=(0, 0, 0))
            text = name if size == 0 and name.startswith("peak") else f"{name}: {_g(size)}"
            d.text((lx + 18, ly + 1), text, fill=(0, 0, 0), font=small)
        y += line_h * math.ceil(len(segs) / 2) + pad
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
