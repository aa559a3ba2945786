"""The merge engine's own promises: in place, bounded working memory, exact undo, transitions."""

from __future__ import annotations

import torch
from lora_factory import TINY, base_state_dict, write_lora

from lora_ops import MergeOptions, MergeReport, load_lora, merge_loras, restore
from lora_ops.flux import flux_weight_shapes
from lora_ops.synthetic import write_kohya_lora


class TinyFlux(torch.nn.Module):
    """Parameters named like ComfyUI's model (`diffusion_model.` prefix)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.diffusion_model = torch.nn.Module()
        self.params = torch.nn.ParameterDict()
        for name, tensor in state.items():
            self.params[name.replace(".", "__")] = torch.nn.Parameter(tensor.clone(), requires_grad=False)

    def named_parameters(self, *args, **kwargs):
        for name, p in self.params.items():
            yield "diffusion_model." + name.replace("__", "."), p


def test_merges_into_module_parameters_in_place(tmp_path):
    base = base_state_dict(TINY, seed=0)
    model = TinyFlux(base)
    lora = load_lora(write_lora("kohya", tmp_path / "k.safetensors", TINY, rank=4, seed=1).path)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    state = merge_loras(model, [(lora, 1.0)])
    changed = 0
    for name, p in model.named_parameters():
        assert p.data_ptr() == pointers[name]
        changed += not torch.equal(p, base[name.removeprefix("diffusion_model.")])
    assert changed == len(lora.targets)
    restore(model, state)
    assert all(torch.equal(p, base[n.removeprefix("diffusion_model.")]) for n, p in model.named_parameters())


def test_working_memory_stays_within_the_tile_budget(tmp_path):
    lora = load_lora(write_lora("kohya", tmp_path / "k.safetensors", TINY, rank=4, seed=1).path)
    widest = max(shape[-1] for shape in flux_weight_shapes(TINY).values())
    for budget in (256 * widest * 24, 64 * 1024 * 1024):
        report = MergeReport()
        merge_loras(base_state_dict(TINY, seed=0), [(lora, 1.0)], tile_bytes=budget, report=report)
        assert 0 < report.peak_tile_bytes <= budget


def test_mixed_kinds_transition_and_restore_are_exact(tmp_path):
    base = base_state_dict(TINY, seed=0)
    weights = {k: v.clone() for k, v in base.items()}
    loras = {
        fmt: load_lora(write_lora(fmt, tmp_path / f"{fmt}.safetensors", TINY, rank=3, seed=i, base=base).path)
        for i, fmt in enumerate(["kohya", "dora", "loha", "lokr_lowrank", "bfl_control", "full_diff"])
    }
    first = [(loras["kohya"], 0.7), (loras["dora"], 1.0), (loras["bfl_control"], 1.0)]
    second = [(loras["loha"], -0.4), (loras["lokr_lowrank"], 1.3), (loras["full_diff"], 0.5), (loras["dora"], 0.3)]
    state = merge_loras(weights, first, tile_bytes=64 * 1024)
    state = merge_loras(weights, second, state=state, tile_bytes=1 << 20)
    fresh = {k: v.clone() for k, v in base.items()}
    merge_loras(fresh, second)
    assert all(torch.equal(weights[k], fresh[k]) for k in base)
    restore(weights, state)
    assert all(torch.equal(weights[k], base[k]) for k in base)


def test_journal_is_sparse_for_realistic_loras_and_never_larger_than_the_weights(tmp_path):
    realistic = load_lora(write_kohya_lora(tmp_path / "r.safetensors", TINY, rank=4, relative_change=0.02))
    huge = load_lora(write_lora("kohya", tmp_path / "k.safetensors", TINY, rank=4, seed=1).path)
    for lora, bound in ((realistic, 0.15), (huge, 1.0)):
        report = MergeReport()
        state = merge_loras(base_state_dict(TINY, seed=0), [(lora, 1.0)], report=report)
        assert state.journal_bytes <= bound * report.elements * 2


def test_progress_reports_every_weight(tmp_path):
    lora = load_lora(write_lora("kohya", tmp_path / "k.safetensors", TINY, rank=4, seed=1).path)
    seen: list[tuple[int, int]] = []
    merge_loras(
        base_state_dict(TINY, seed=0), [(lora, 1.0)], options=MergeOptions(progress=lambda d, t: seen.append((d, t)))
    )
    assert len(seen) == len(lora.targets)
    assert seen[-1][0] == seen[-1][1] and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
