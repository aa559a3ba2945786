"""The merge engine: LoRAs into model weights, in place, row tile by row tile.

For each target weight and each tile of rows: decode the stored rows to fp32, add every adapter's
change (strength x scale x delta) in fp32, round once into the storage dtype, write back. Extra
memory is a few tile-sized fp32 buffers; there is no full-layer fp32 copy and no backup.

Exact undo without a backup: the rounding loses information only where W+ΔW crosses into a
coarser binade. After writing a tile, the engine recomputes what undo would recover and keeps,
in a sparse *journal* (flat index, original value), only the elements where that differs
(typically 1-4 % of the merged elements for bf16, stored in system RAM). With it, a later call can
move the weights from the merged stack to any other stack (new strengths, other LoRAs, or none)
bit-exactly in one pass, and a failure midway (bad tensor, out of memory, interrupt) rolls every
touched tile back to its exact previous bits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import rows
from .errors import LoRAOpsError, ModelMismatchError, UndoError, is_out_of_memory
from .flux import strip_model_prefix
from .formats import LoRAFile, check_fits
from .heap import trim_heap
from .journal import Arithmetic, Journal, threads_of
from .rows import FP8_BUFFERS, Codec, Term, tile_budget, tile_rows_for, working_bytes
from .transition import KeyJob, RollbackReserve, rollback_bytes
from .units import MIB


@dataclass
class MergeState:
    """What is merged into a set of weights now; pass it to the next merge or to `restore`.

    Per weight: the journal (None: merged with exact_undo=False, so it cannot be undone), the fingerprint of
    its original bits (checked after every undo) and the arithmetic its change was computed with.
    """

    stack: list[tuple[LoRAFile, float]] = field(default_factory=list)
    journals: dict[str, Journal | None] = field(default_factory=dict)
    dora_norms: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    codec_state: dict[str, object] = field(default_factory=dict)  # what codecs keep between calls (fp8 base scales)
    fingerprints: dict[str, torch.Tensor] = field(default_factory=dict)
    arithmetic: dict[str, Arithmetic] = field(default_factory=dict)

    @property
    def journal_bytes(self) -> int:
        return sum(j.nbytes for j in self.journals.values() if j is not None)

    @classmethod
    def combine(cls, stack: list[tuple[LoRAFile, float]], parts: Iterable[MergeState | None]) -> MergeState:
        """One state for a stack that was merged in several calls over disjoint sets of weights."""
        out = cls(list(stack))
        for part in parts:
            if part is not None:
                for name in ("journals", "dora_norms", "codec_state", "fingerprints", "arithmetic"):
                    getattr(out, name).update(getattr(part, name))
        return out


@dataclass
class MergeOptions:
    """Knobs of one merge call."""

    tile_bytes: int | None = None  # working-memory budget for one tile; None = 64 MiB
    compute_device: torch.device | str | None = None  # None: compute where each weight lives
    on_tile: Callable[[str, int, int], None] | None = None  # (key, tile index, rows); may raise to cancel
    progress: Callable[[int, int], None] | None = None  # (elements done, elements total)
    codec_for: Callable[[str, torch.Tensor], Codec] | None = None
    min_tile_bytes: int = MIB  # out-of-memory retries halve the tile down to this
    exact_undo: bool = True  # keep the journal after the call (off for merges into a copy, e.g. the offline writer)


@dataclass
class MergeReport:
    keys: int = 0
    elements: int = 0
    tile_rows_max: int = 0
    peak_tile_bytes: int = 0
    journal_bytes: int = 0
    retries: int = 0
    reserve_bytes: int = 0  # memory held back during the call for a rollback (see transition.RollbackReserve)


def weight_map(target: Mapping[str, torch.Tensor] | torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bare BFL name → the live tensor to change in place, for a state dict or a module."""
    if isinstance(target, torch.nn.Module):
        items = ((name, p.data) for name, p in target.named_parameters())
    else:
        items = target.items()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        out[strip_model_prefix(name)[1]] = tensor
    return out


def terms_by_target(stack: Sequence[tuple[LoRAFile, float]]) -> dict[str, list[Term]]:
    """Every (adapter, strength × block multiplier) of a stack, grouped by the weight it changes."""
    out: dict[str, list[Term]] = {}
    for lora, strength in stack:
        for target, adapters in lora.targets.items():
            coeff = lora.strength_on(target, strength)
            out.setdefault(target, []).extend((a, coeff) for a in adapters if coeff != 0.0)
    return out


def _same_terms(a: list[Term], b: list[Term]) -> bool:
    return len(a) == len(b) and all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b))


def merge_loras(
    target: Mapping[str, torch.Tensor] | torch.nn.Module,
    loras: Sequence[tuple[LoRAFile, float]],
    *,
    state: MergeState | None = None,
    tile_bytes: int | None = None,
    options: MergeOptions | None = None,
    report: MergeReport | None = None,
) -> MergeState:
    """Make the weights of `target` equal base + the given stack, in place; return the new state.

    `state` is what an earlier call returned for the same weights: the engine then moves the
    weights from that stack to this one in one pass (strength changes, swaps, `[]` to restore).
    On any failure every weight is put back exactly as it was (checked) and the error is raised.
    An out-of-memory error is retried with half the tile size, down to `min_tile_bytes`. When the
    rollback itself fails, or an undo would not give back the original bits, UndoError is raised
    naming the weights (never a retry over weights that are not as they were).
    """
    for lora, strength in loras:
        if not math.isfinite(float(strength)):
            raise LoRAOpsError(f"{lora.path}: strength {strength} is not a finite number; use a value such as 0.8")
    options = options or MergeOptions()
    requested = tile_bytes or options.tile_bytes
    budget = tile_budget(torch.device(options.compute_device or _first_device(target)), requested)
    report = report if report is not None else MergeReport()
    while True:
        try:
            merged = _merge_once(target, loras, state or MergeState(), budget, options, report)
            trim_heap()  # freed tiles would otherwise stay resident in glibc's heap (see heap.py)
            return merged
        except UndoError:
            raise
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if not is_out_of_memory(error) or budget // 2 < options.min_tile_bytes:
                raise
            budget //= 2
            report.retries += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _first_device(target) -> torch.device:
    """Where the weights live (for the default tile budget): the first tensor's device."""
    for tensor in weight_map(target).values():
        return tensor.device
    return torch.device("cpu")


def restore(target, state: MergeState, **kw) -> MergeState:
    """Take every merged LoRA out again, exactly; returns an empty state."""
    return merge_loras(target, [], state=state, **kw)


def _changed_keys(weights, state: MergeState, old_terms, new_terms) -> list[str]:
    """The weights whose terms change, after checking that each can be changed (and undone) exactly."""
    touched = dict.fromkeys([*old_terms, *new_terms])
    keys = [k for k in touched if not _same_terms(old_terms.get(k, []), new_terms.get(k, []))]
    for key in keys:
        if key not in weights:
            raise ModelMismatchError(f"the merged state names {key!r}, which the model does not have")
        if old_terms.get(key) and state.journals.get(key) is None:
            raise LoRAOpsError(
                f"{key!r} was merged with exact_undo=False, so its LoRAs cannot be taken out exactly; nothing was "
                "changed. Reload the model from its file (or merge with exact_undo=True to change strengths later)."
            )
    return keys


def _arithmetic_for(key: str, weight: torch.Tensor, state: MergeState, has_old: bool,
                    options: MergeOptions) -> Arithmetic:
    """The merge's recorded arithmetic when this call undoes it (so undo is exact), else the requested one."""
    requested = Arithmetic.on(torch.device(options.compute_device or weight.device))
    recorded = state.arithmetic.get(key) if has_old else None
    if recorded is None or recorded == requested:
        return requested
    if recorded.available():
        return recorded
    warnings.warn(
        f"{key!r} was merged on {recorded.device}, which is not available now: undoing it on {requested.device} "
        "and checking the result against the original bits' fingerprint (an error if they differ)",
        stacklevel=4,
    )
    return requested


def _run_job(job: KeyJob, budget: int, options: MergeOptions, report: MergeReport, expected) -> None:
    cols = job.matrix.shape[1]
    blocks = len(job.old) + len(job.new)
    rows_per_tile = tile_rows_for(cols, budget, blocks)
    job.prepare_norms(rows_per_tile)
    merged = (lambda: job.merged_tiles(rows_per_tile)) if job.new else None
    job.codec.begin(merged, bool(job.old), job.state.codec_state)
    for i, (r0, r1) in enumerate(rows.tiles(job.matrix.shape[0], rows_per_tile)):
        if options.on_tile is not None:
            options.on_tile(job.key, i, r1 - r0)
        job.run_tile(r0, r1)
        report.tile_rows_max = max(report.tile_rows_max, r1 - r0)
        report.peak_tile_bytes = max(report.peak_tile_bytes, working_bytes(r1 - r0, cols, blocks))
    job.check_base(expected)
    for journal in (job.new_journal, job.undo_journal):
        journal.settle()  # one transfer per weight (a GPU tile loop never waits for the host)
    job.codec.commit()
    job.release_terms()


def _roll_back(jobs: list[KeyJob], error: BaseException, reserve: RollbackReserve) -> None:
    """Undo every job (latest first) in the memory the reserve gives back; UndoError names those whose bits could
    not be put back."""
    reserve.release()
    failed: list[KeyJob] = []
    for job in reversed(jobs):
        try:
            with threads_of(job.arithmetic):
                job.rollback()
        except BaseException:  # keep rolling the others back
            failed.append(job)
    if failed:
        keys = [job.key for job in failed]
        raise UndoError(
            f"{' '.join(str(error).split())[:200] or type(error).__name__}; then rolling back failed for "
            f"{len(keys)} weights ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}), which may hold "
            "wrong values now. Reload the model from its file.",
            keys, unchanged=False, originals=_original_prints(failed),
        ) from error


def _original_prints(jobs: list[KeyJob]) -> dict[str, torch.Tensor]:
    """The fingerprints of the original bits of weights whose rollback failed, where they can still be known."""
    out = {}
    for job in jobs:
        try:
            found = job.original_print()
        except Exception:  # a reload of this weight then cannot be checked, and is refused
            found = None
        if found is not None:
            out[job.key] = found
    return out


def _reserve_needs(steps, options: MergeOptions) -> dict[torch.device, int]:
    """Per compute device, the most any one weight's rollback may need (see RollbackReserve)."""
    codec_buffers = FP8_BUFFERS if options.codec_for else 0
    needs: dict[torch.device, int] = {}
    for _key, weight, old, new, arithmetic in steps:
        device = torch.device(arithmetic.device)
        cols = weight.numel() // max(weight.shape[0], 1)
        terms = [*old, *new]
        factors = sum(t.numel() for adapter, _ in terms for t in adapter.factors().values())
        needs[device] = max(needs.get(device, 0), rollback_bytes(cols, factors, len(terms), codec_buffers))
    return needs


def _merge_once(
    target, loras, state: MergeState, budget: int, options: MergeOptions, report: MergeReport
) -> MergeState:
    weights = weight_map(target)
    shape_of = lambda key: tuple(weights[key].shape) if key in weights else None  # noqa: E731
    for lora, _ in loras:
        check_fits(lora, shape_of)
    old_terms, new_terms = terms_by_target(state.stack), terms_by_target(loras)
    keys = _changed_keys(weights, state, old_terms, new_terms)
    total = sum(weights[k].numel() for k in keys)
    new_state = MergeState(list(loras), dict(state.journals), dict(state.dora_norms), dict(state.codec_state),
                           dict(state.fingerprints), dict(state.arithmetic))
    steps = []  # (key, weight, old terms, new terms, arithmetic) of every weight this call changes
    for key in keys:
        weight, old, new = weights[key], old_terms.get(key, []), new_terms.get(key, [])
        steps.append((key, weight, old, new, _arithmetic_for(key, weight, state, bool(old), options)))
    reserve = RollbackReserve()
    reserve.hold(_reserve_needs(steps, options))
    report.reserve_bytes = max(report.reserve_bytes, reserve.nbytes)
    jobs: list[KeyJob] = []
    workspace = rows.Workspace()  # one set of tile buffers for every weight of this call
    done = 0
    try:
        for key, weight, old, new, arithmetic in steps:
            codec = options.codec_for(key, weight) if options.codec_for else Codec(weight.dtype)
            with threads_of(arithmetic):
                jobs.append(KeyJob(key, weight, old, new, state.journals.get(key), codec, arithmetic, new_state,
                                   options.exact_undo, workspace))
                _run_job(jobs[-1], budget, options, report, state.fingerprints.get(key))
            done += weight.numel()
            if options.progress is not None:
                options.progress(done, total)
    except BaseException as error:
        _roll_back(jobs, error, reserve)
        raise
    _finish(new_state, jobs, new_terms, report)
    return new_state


def _finish(new_state: MergeState, jobs: list[KeyJob], new_terms, report: MergeReport) -> None:
    """Record, per weight, what the next call needs to undo this one."""
    for job in jobs:
        if job.keeps_terms:
            new_state.journals[job.key] = job.finished_journal()
            new_state.fingerprints[job.key] = job.base_print.cpu()
            new_state.arithmetic[job.key] = job.arithmetic
        else:
            for table in (new_state.journals, new_state.fingerprints, new_state.arithmetic):
                table.pop(job.key, None)
        report.keys += 1
        report.elements += job.weight.numel()
    live = {(k, id(a)) for k, terms in new_terms.items() for a, _ in terms}
    new_state.dora_norms = {k: v for k, v in new_state.dora_norms.items() if k in live}
    report.journal_bytes = new_state.journal_bytes
