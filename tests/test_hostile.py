"""Bad files (tests/hostile_files.py) through the library and the command line.

For every case: a clear error that names the file, the key (where there is one) and the problem and says what
to do (command line: one line on stderr, exit code 2, no traceback); no output file left behind (no new file in
the output folder, temporary `.partial` files included); the input files byte-identical afterwards; the model in
memory bit-identical (key by key). Pickles are never unpickled (their payload would create a sentinel folder).

Node level: `nodes/library.load_cached` is a pure function, but importing it runs `nodes/__init__.py`, which
imports `nodes.v1` -> `nodes.definitions` -> ComfyUI's `folder_paths`; there is no entry point callable without
ComfyUI yet, so there are no node-level cases here.

"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hostile_files as hf
import pytest
import torch
from hostile_bytes import SENTINEL
from hostile_loras import kohya_tensors, model_state_dict, write_model, write_valid_lora
from tensor_checks import assert_same_bits, sha256, snapshot

from lora_ops import errors, load_lora, merge_loras, restore
from lora_ops.errors import LoRAFormatWarning, LoRAOpsError
from lora_ops.offline import merge_checkpoint

REPO = Path(__file__).resolve().parents[1]
#: Every message must say what to do about the problem.
ADVICE = re.compile(
    r"download|export|convert|\buse\b|remove|\bgive\b|\bpass\b|check|choose|free|write elsewhere|\blower\b", re.I
)
COUNTS: Counter = Counter()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ helpers


def fingerprint(*dirs: Path) -> dict[str, str]:
    """Every file (hidden ones included) under the folders -> its hash."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            out[str(p)] = sha256(p) if p.is_file() else "<dir>"
    return out


def check_message(message: str, case: hf.Hostile, path: Path) -> None:
    """Names the file, the key (where there is one) and the problem, says what to do; one line."""
    assert str(path) in message, f"{case.name}: message does not name the file: {message}"
    key = case.key_for(path)
    if key is not None:
        assert key in message, f"{case.name}: message does not name the key {key!r}: {message}"
    assert re.search(case.words, message, re.I | re.S), f"{case.name}: problem not stated ({case.words}): {message}"
    assert ADVICE.search(message), f"{case.name}: message does not say what to do: {message}"
    assert "\n" not in message, f"{case.name}: message is not one line: {message!r}"
    COUNTS["clear errors"] += 1


def no_sentinel(directory: Path) -> None:
    assert not (directory / SENTINEL).exists(), "a pickle was unpickled"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """All hostile files (one folder per case), a valid Flux model file and a valid LoRA."""
    root = tmp_path_factory.mktemp("hostile")
    paths = {h.name: h.write(root / "cases" / h.name) for h in hf.HOSTILE}
    (root / "model").mkdir()
    (root / "good").mkdir()
    model = write_model(root / "model" / "flux_tiny.safetensors")
    good = write_valid_lora(root / "good" / "good.safetensors")
    yield {"root": root, "paths": paths, "model": model, "good": good}
    print(f"\n[test_hostile] counts: {dict(COUNTS)}")


def case_dir(world, case: hf.Hostile) -> Path:
    return world["paths"][case.name].parent


def load_good(world):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoRAFormatWarning)
        return load_lora(world["good"])


# ------------------------------------------------------------------------------------------------ library


@pytest.mark.parametrize("case", hf.cases("load"), ids=lambda h: h.name)
def test_load_lora_refuses(world, case):
    path = world["paths"][case.name]
    before = fingerprint(case_dir(world, case))
    COUNTS["cases"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoRAFormatWarning)
        with pytest.raises(getattr(errors, case.error)) as caught:
            load_lora(path)
    assert isinstance(caught.value, LoRAOpsError)
    check_message(str(caught.value), case, path)
    no_sentinel(path.parent)
    assert fingerprint(case_dir(world, case)) == before, "the input file changed"


@pytest.mark.parametrize("case", hf.cases("fit"), ids=lambda h: h.name)
def test_merge_loras_refuses_and_changes_nothing(world, case):
    path = world["paths"][case.name]
    before_files = fingerprint(case_dir(world, case))
    COUNTS["cases"] += 1
    lora = load_lora(path)
    good = load_good(world)
    sd = model_state_dict()
    original = snapshot(sd)
    # alone, after a good LoRA in the same stack, and as a change from a merged state
    for stack in ([(lora, 1.0)], [(good, 0.8), (lora, -0.5)]):
        with pytest.raises(errors.ModelMismatchError) as caught:
            merge_loras(sd, stack, tile_bytes=4096)
        check_message(str(caught.value), case, path)
        assert_same_bits(sd, original)
    state = merge_loras(sd, [(good, 0.8)], tile_bytes=4096)
    merged = snapshot(sd)
    with pytest.raises(errors.ModelMismatchError):
        merge_loras(sd, [(good, 0.3), (lora, 1.0)], state=state, tile_bytes=4096)
    assert_same_bits(sd, merged)
    restore(sd, state)
    assert_same_bits(sd, original)
    assert fingerprint(case_dir(world, case)) == before_files


@pytest.mark.parametrize("case", hf.cases("fit"), ids=lambda h: h.name)
def test_offline_merge_refuses_a_lora_for_another_model(world, case, tmp_path):
    path = world["paths"][case.name]
    inputs = fingerprint(case_dir(world, case), world["model"].parent, world["good"].parent)
    COUNTS["cases"] += 1
    lora, good = load_lora(path), load_good(world)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(errors.ModelMismatchError) as caught:
        merge_checkpoint(world["model"], [(good, 1.0), (lora, 1.0)], out / "merged.safetensors")
    check_message(str(caught.value), case, path)
    assert list(out.iterdir()) == []
    assert fingerprint(case_dir(world, case), world["model"].parent, world["good"].parent) == inputs


@pytest.mark.parametrize("case", hf.cases("model"), ids=lambda h: h.name)
def test_offline_merge_refuses_a_bad_model(world, case, tmp_path):
    path = world["paths"][case.name]
    inputs = fingerprint(case_dir(world, case), world["good"].parent)
    COUNTS["cases"] += 1
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(getattr(errors, case.error)) as caught:
        merge_checkpoint(path, [(load_good(world), 1.0)], out / "merged.safetensors")
    check_message(str(caught.value), case, path)
    no_sentinel(path.parent)
    assert list(out.iterdir()) == []
    assert fingerprint(case_dir(world, case), world["good"].parent) == inputs


def test_in_memory_model_that_is_not_flux(world):
    """merge_loras into a state dict that is not Flux: refused before anything changes."""
    COUNTS["cases"] += 1
    g = torch.Generator().manual_seed(0)
    sd = {f"input_blocks.{i}.0.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16) for i in range(3)}
    before = snapshot(sd)
    good = load_good(world)
    with pytest.raises(errors.ModelMismatchError) as caught:
        merge_loras(sd, [(good, 1.0)])
    message = str(caught.value)
    assert str(world["good"]) in message and "double_blocks.0.img_attn.qkv.weight" in message
    assert "does not have" in message and ADVICE.search(message)
    COUNTS["clear errors"] += 1
    assert_same_bits(sd, before)


def test_missing_alpha_is_valid_scale_one_and_reported(world, tmp_path):
    """No alpha: scale 1 (alpha = rank), said in the coverage notes and by `inspect`; not an error."""
    COUNTS["cases"] += 1
    path = tmp_path / "no_alpha.safetensors"
    from safetensors.torch import save_file

    save_file(kohya_tensors(alpha=None), str(path))
    before = sha256(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoRAFormatWarning)
        lora = load_lora(path)
    scales = {a.scale for adapters in lora.targets.values() for a in adapters}
    assert scales == {1.0}
    assert any("no alpha" in n for n in lora.coverage.notes), lora.coverage.notes
    with_alpha = load_good(world)
    assert {a.scale for ads in with_alpha.targets.values() for a in ads} == {0.5}
    run = subprocess.run([sys.executable, "-m", "lora_ops", "inspect", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "no alpha" in run.stdout and "scale 1" in run.stdout
    assert sha256(path) == before


def test_huge_header_is_refused_before_it_is_read(world):
    """A header length of 300 MB (in a 300 MB sparse file) is refused from its 8 length bytes alone."""
    import tracemalloc

    path = world["paths"]["header_claims_300MB_sparse"]
    assert path.stat().st_size == 300 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(errors.UnsafeFileError, match="limit"):
            load_lora(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak} bytes allocated while refusing the header"


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_strength_is_refused(world, cli, strength, tmp_path):
    """A strength of NaN/Inf (e.g. `--lora x:nan`) would write a model full of NaN: refused, nothing written."""
    COUNTS["cases"] += 2
    inputs = (world["model"].parent, world["good"].parent)
    before = fingerprint(*inputs)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LoRAOpsError) as caught:
        merge_checkpoint(world["model"], [(load_good(world), strength)], out / "m.safetensors")
    message = str(caught.value)
    assert str(world["good"]) in message and "strength" in message and ADVICE.search(message), message
    COUNTS["clear errors"] += 1
    run = cli.run(["merge", str(world["model"]), "--lora", f"{world['good']}:{strength}", "--out",
                   str(out / "m.safetensors"), "--device", "cpu"])
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert str(world["good"]) in run.stderr and "not a finite number" in run.stderr, run.stderr
    COUNTS["clear errors"] += 1
    assert list(out.iterdir()) == [] and fingerprint(*inputs) == before


def test_strength_that_overflows_the_output_dtype_is_refused(world, tmp_path):
    """Finite weights must not become Inf in the output (fp16 holds at most 65504): refused, nothing written."""
    COUNTS["cases"] += 1
    out = tmp_path / "out"
    out.mkdir()
    before = fingerprint(world["model"].parent, world["good"].parent)
    with pytest.raises(LoRAOpsError) as caught:
        merge_checkpoint(world["model"], [(load_good(world), 1e9)], out / "m.safetensors", dtype="fp16")
    message = str(caught.value)
    assert str(world["model"]) in message and str(world["good"]) in message and "overflow" in message, message
    assert "weight'" in message and ADVICE.search(message), message
    COUNTS["clear errors"] += 1
    assert list(out.iterdir()) == []
    assert fingerprint(world["model"].parent, world["good"].parent) == before


def test_merge_loras_refuses_a_non_finite_strength(world):
    sd = model_state_dict()
    before = snapshot(sd)
    with pytest.raises(LoRAOpsError):
        merge_loras(sd, [(load_good(world), float("nan"))])
    assert_same_bits(sd, before)


def test_output_over_an_input_is_refused(world, cli, tmp_path):
    """--out naming the model or a LoRA (directly or through a symlink): refused, the input untouched."""
    link = tmp_path / "link.safetensors"
    link.symlink_to(world["model"])
    good = load_good(world)
    for out in (world["model"], world["good"], link):
        COUNTS["cases"] += 2
        before = fingerprint(world["model"].parent, world["good"].parent)
        with pytest.raises(LoRAOpsError) as caught:
            merge_checkpoint(world["model"], [(good, 1.0)], out)
        assert str(out) in str(caught.value) and "input" in str(caught.value) and ADVICE.search(str(caught.value))
        run = cli.run(["merge", str(world["model"]), "--lora", str(world["good"]), "--out", str(out),
                       "--device", "cpu"])
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and str(out) in run.stderr
        COUNTS["clear errors"] += 2
        assert fingerprint(world["model"].parent, world["good"].parent) == before
    assert link.is_symlink() and link.resolve() == world["model"].resolve()


# ------------------------------------------------------------------------------------------------ command line
#
# `python -m lora_ops` spends ~1.5 s of CPU importing torch, and there are ~130 command-line runs. So every run
# goes through a fork server: one `python` process imports lora_ops once, then for each run forks a child that
# executes `lora_ops.__main__` as `__main__` (what `python -m lora_ops` runs) with that argv, stdout/stderr
# redirected to files; an uncaught exception prints its traceback and exits 1, as the interpreter does. A subset
# of the runs (REAL) is also made with a real `python -m lora_ops` subprocess and must give the same exit code
# and stderr, so the server cannot hide a difference.

_FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import lora_ops.cli  # noqa: F401  (torch and lora_ops, imported once)
import torch
torch.set_num_threads(1)  # tiny tensors; the children inherit it
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = [os.path.join(os.path.dirname(lora_ops.cli.__file__), "__main__.py"), *job["args"]]
            try:
                runpy.run_module("lora_ops", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, int) and e.code is not None:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""

#: (case, command) pairs also run as a real `python -m lora_ops` subprocess.
REAL = {("empty", "inspect"), ("pickle_p2_renamed", "inspect"), ("header_nested_deep", "inspect"),
        ("factor_nan", "merge"), ("two_schemes_suffix", "merge"), ("other_hidden_size", "merge"),
        ("model_truncated", "merge"), ("offsets_gap", "merge")}


class ForkServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        self.proc.stdin.write(json.dumps({"args": args, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return subprocess.CompletedProcess(args, json.loads(line), out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ops", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def cli(world):
    logs = world["root"] / "cli_logs"
    logs.mkdir()
    server = ForkServer(logs)
    yield server
    server.close()


def _cli_args(world, case: hf.Hostile, cmd: str, out: Path) -> list[str]:
    path = world["paths"][case.name]
    if cmd == "inspect":
        return ["inspect", str(path)]
    merged = str(out / "merged.safetensors")
    if case.stage == "load":
        return ["merge", str(world["model"]), "--lora", str(world["good"]), "--lora", f"{path}:0.5", "--out", merged,
                "--device", "cpu"]
    if case.stage == "fit":
        return ["merge", str(world["model"]), "--lora", str(path), "--out", merged, "--device", "cpu"]
    return ["merge", str(path), "--lora", str(world["good"]), "--out", merged, "--device", "cpu"]


@pytest.fixture(scope="module")
def real_runs(world):
    """The REAL pairs as real `python -m lora_ops` subprocesses, in parallel (each into its own out folder)."""
    jobs = []
    for name, cmd in sorted(REAL):
        out = world["root"] / "real_out" / f"{name}-{cmd}"
        out.mkdir(parents=True)
        jobs.append(((name, cmd), _cli_args(world, hf.BY_NAME[name], cmd, out), out))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        runs = list(pool.map(lambda job: _cli(job[1]), jobs))
    return {pair: (run, out) for (pair, _, out), run in zip(jobs, runs, strict=True)}


def check_cli_error(run: subprocess.CompletedProcess, case: hf.Hostile, path: Path) -> None:
    assert "Traceback" not in run.stderr, f"{case.name}: traceback:\n{run.stderr}"
    assert run.returncode == 2, f"{case.name}: exit {run.returncode}\n{run.stderr}"
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, f"{case.name}: stderr is not one line:\n{run.stderr}"
    assert lines[0].startswith("error: ")
    check_message(lines[0], case, path)


def _cli_case(world, cli, real_runs, case: hf.Hostile, cmd: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run one command on one case; check inputs unchanged, nothing written, no pickle ran."""
    COUNTS["cases"] += 1
    out = tmp_path / "out"
    out.mkdir()
    inputs = (case_dir(world, case), world["model"].parent, world["good"].parent)
    before = fingerprint(*inputs)
    run = cli.run(_cli_args(world, case, cmd, out))
    assert list(out.iterdir()) == [], f"{case.name}: left {list(out.iterdir())}"
    assert fingerprint(*inputs) == before, f"{case.name}: an input file changed"
    no_sentinel(case_dir(world, case))
    if (case.name, cmd) in real_runs:
        real, real_out = real_runs[(case.name, cmd)]
        assert list(real_out.iterdir()) == []
        assert (real.returncode, real.stderr.replace(str(real_out), str(out))) == (run.returncode, run.stderr), (
            f"{case.name}: the fork server and `python -m lora_ops` disagree")
        COUNTS["real subprocess runs"] += 1
    return run


@pytest.mark.parametrize("case", hf.HOSTILE, ids=lambda h: h.name)
def test_cli_merge_refuses_and_writes_nothing(world, cli, real_runs, case, tmp_path):
    run = _cli_case(world, cli, real_runs, case, "merge", tmp_path)
    check_cli_error(run, case, world["paths"][case.name])
    assert run.stdout == ""


@pytest.mark.parametrize("case", hf.cases("load", "fit"), ids=lambda h: h.name)
def test_cli_inspect(world, cli, real_runs, case, tmp_path):
    run = _cli_case(world, cli, real_runs, case, "inspect", tmp_path)
    if case.stage == "fit":
        # a well-formed LoRA for another model: inspect describes it (the merge refuses it)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    else:
        check_cli_error(run, case, world["paths"][case.name])
        assert run.stdout == ""


@pytest.mark.parametrize("case", hf.cases("fit", "model"), ids=lambda h: h.name)
def test_cli_merge_to_fp8_refuses_and_writes_nothing(world, cli, case, tmp_path):
    """`merge --dtype fp8` (lora_ops.fp8.merge_checkpoint_fp8) checks model and fit the same way."""
    COUNTS["cases"] += 1
    out = tmp_path / "out"
    out.mkdir()
    inputs = (case_dir(world, case), world["model"].parent, world["good"].parent)
    before = fingerprint(*inputs)
    run = cli.run([*_cli_args(world, case, "merge", out), "--dtype", "fp8"])
    check_cli_error(run, case, world["paths"][case.name])
    assert list(out.iterdir()) == [] and fingerprint(*inputs) == before
    no_sentinel(case_dir(world, case))


def test_cli_missing_file_and_directory(world, cli, tmp_path):
    COUNTS["cases"] += 2
    for target, words in ((tmp_path / "missing.safetensors", "No such file"), (tmp_path, "directory")):
        run = cli.run(["inspect", str(target)])
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        line = run.stderr.strip()
        assert "\n" not in line and str(target) in line and words.lower() in line.lower(), line
        COUNTS["clear errors"] += 1
    run = cli.run(["merge", str(world["model"]), "--lora", str(world["good"]), "--out",
                str(tmp_path / "no_such_dir" / "out.safetensors"), "--device", "cpu"])
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "no_such_dir" in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "no_such_dir").exists()
    COUNTS["clear errors"] += 1
