"""lora_ops.verify: the checksums and the on-copies check the nodes use to prove a merge reached the weights."""

from __future__ import annotations

import torch
from lora_factory import TINY, base_state_dict, write_lora

from lora_ops import changes_on_copies, checksum, checksums, load_lora


def test_checksum_sees_any_single_changed_element_and_odd_sizes():
    t = torch.randn(33, 7).to(torch.bfloat16)  # 462 bytes: not a whole number of 64-bit words
    base = checksum(t)
    assert checksum(t.clone()) == base
    for i in (0, 100, t.numel() - 1):  # first, middle, the tail beyond the last whole word
        changed = t.clone()
        changed.view(-1).view(torch.int16)[i] += 1
        assert checksum(changed) != base, i
    assert checksum(torch.empty(0)) == checksum(torch.empty(0, dtype=torch.float16))


def test_changes_on_copies_tells_a_real_change_from_none(tmp_path):
    base = base_state_dict(TINY, 0)
    case = write_lora("kohya", tmp_path / "k.safetensors", TINY, 4, 1)
    lora = load_lora(case.path)
    keys = sorted(case.expected)
    before = checksums(base, keys)
    assert changes_on_copies(base, [(lora, 1.0)], keys) == set(keys)
    assert changes_on_copies(base, [(lora, 1e-9)], keys) == set()  # far below bf16's step: nothing to change
    assert checksums(base, keys) == before  # the weights themselves are never touched
