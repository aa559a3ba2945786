"""The ComfyUI version range: pyproject's requires-comfyui, the check at registration, the refusal at the node."""

from __future__ import annotations

import logging
import sys

import pytest
import tomllib
from inprocess import REPO_ROOT, entry


@pytest.fixture(scope="module")
def compat(pack):
    return sys.modules[pack.__name__ + ".nodes.compat"]


def test_pyproject_states_the_range_the_pack_checks(compat):
    comfy_table = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy_table["requires-comfyui"] == f">={compat.MIN_COMFYUI}"


def test_this_comfyui_is_supported(comfy, compat):
    version = compat.comfyui_version()
    assert version is not None and compat.version_problem(version) is None
    compat.require_supported()


@pytest.mark.parametrize("version", ["0.3.50", "0.2.7", None])
def test_an_older_comfyui_gets_a_clear_refusal_and_nothing_changes(
    comfy, pack, compat, rt, plain, loras, monkeypatch, caplog, version
):
    monkeypatch.setattr(compat, "comfyui_version", lambda: version)
    with caplog.at_level(logging.ERROR, logger="flux_lora_ops"):
        compat.check_at_registration()
    assert "0.3.64" in caplog.text and "Update ComfyUI" in caplog.text
    before = (plain.patches_uuid, dict(plain.attachments), type(plain))
    for attach in (lambda: rt.attach_plan(plain, [entry(rt, loras["a"], 1.0)]), lambda: rt.attach_fp8(plain)):
        with pytest.raises(pack.lora_ops.LoRAOpsError) as caught:
            attach()
        assert "0.3.64" in str(caught.value) and (version or "no comfyui_version.py") in str(caught.value)
    assert (plain.patches_uuid, dict(plain.attachments), type(plain)) == before


def test_a_newer_comfyui_than_tested_is_warned_about(comfy, compat, monkeypatch, caplog):
    monkeypatch.setattr(compat, "comfyui_version", lambda: "9.0.0")
    with caplog.at_level(logging.WARNING, logger="flux_lora_ops"):
        compat.check_at_registration()
    assert compat.TESTED_UP_TO in caplog.text and "9.0.0" in caplog.text
    compat.require_supported()
