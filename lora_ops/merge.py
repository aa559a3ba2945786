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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import rows
from .adapters import ROW_BLOCK, DoRA
from .errors import LoRAOpsError, ModelMismatchError, UndoError, is_out_of_memory
from .flux import strip_model_prefix
from .formats import LoRAFile, check_fits
from .heap import trim_heap
from .journal import Arithmetic, Journal, differing_bits, fingerprint, threads_of
from .rows import DEFAULT_TILE_BYTES, Codec, Term, tile_budget, tile_rows_for, working_bytes  # noqa: F401 (planner)
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


class _KeyJob:
    """One weight's transition from `old` terms to `new` terms, tile by tile."""

    def __init__(self, key: str, weight: torch.Tensor, old: list[Term], new: list[Term], journal: Journal | None,
                 codec: Codec, arithmetic: Arithmetic, state: MergeState, exact_undo: bool = True,
                 workspace: rows.Workspace | None = None) -> None:
        self.key = key
        self.arithmetic = arithmetic
        device = torch.device(arithmetic.device)
        self.exact_undo = exact_undo
        self.weight = weight
        self.matrix = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)
        self.codec = codec
        self.device = device
        self._sources = (old, new)
        self.old_linear = not any(a.needs_base for a, _ in old)
        self.new_linear = not any(a.needs_base for a, _ in new)
        self.journal = journal
        self.state = state
        self.new_journal = Journal()
        self.undo_journal = Journal()
        self.written: list[tuple[int, int]] = []
        zeros = torch.zeros(1, dtype=torch.int64, device=device)
        self.base_print, self.before_print = zeros, zeros.clone()  # fingerprints of the written rows
        self.workspace = workspace or rows.Workspace()
        self.load_terms()

    def load_terms(self) -> None:
        """fp32 copies of this weight's adapters on the compute device (with known DoRA norms)."""
        self.old, self.new = ([(a.on(self.device), c) for a, c in terms] for terms in self._sources)
        for (dev_adapter, _), (original, _) in zip(self.old + self.new, [*self._sources[0], *self._sources[1]]):
            if isinstance(dev_adapter, DoRA):
                dev_adapter.use_norms(self.state.dora_norms.get((self.key, id(original))))

    @property
    def keeps_terms(self) -> bool:
        """Whether the weight holds LoRA terms after this call (False: it is restored)."""
        return bool(self._sources[1])

    def release_terms(self) -> None:
        """Drop the device copies once the weight is done; `rollback` loads them again."""
        self.old = self.new = None

    # --- deltas -------------------------------------------------------------------------------
    def _delta(self, terms, r0: int, r1: int, base: torch.Tensor | None, slot: str | None = None) -> torch.Tensor:
        out = self._scratch(slot, r1 - r0, torch.float32)
        if out is None:
            return rows.delta(terms, r0, r1, self.matrix.shape[1], self.device, base)
        rows.add_terms(out.zero_(), terms, r0, r1, base)
        return out

    def _scratch(self, slot: str | None, n_rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """A reused tile buffer for the default codec (others make their own tensors)."""
        if slot is None or type(self.codec) is not Codec:
            return None
        return self.workspace.take(slot, (n_rows, self.matrix.shape[1]), dtype, self.device)

    def _decode(self, stored: torch.Tensor, role: str, slot: str | None = None) -> torch.Tensor:
        out = self._scratch(slot, stored.shape[0], torch.float32)
        return self.codec.decode(stored, role) if out is None else out.copy_(stored)

    def _encode(self, values: torch.Tensor, r0: int, role: str, slot: str | None = None) -> torch.Tensor:
        out = self._scratch(slot, values.shape[0], self.codec.dtype)
        return self.codec.encode(values, self.key, r0, role) if out is None else out.copy_(values)

    def _before(self, stored: torch.Tensor, terms, linear: bool, r0: int, r1: int,
                delta: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic estimate of rows before `terms` were added (fp32, not yet rounded).

        Linear kinds: stored − Δ. Base-dependent kinds (DoRA, set): two fixed-point steps. The
        journal records where the rounded estimate misses, so the estimate need not be perfect.
        """
        if linear and delta is not None:
            return stored.sub_(delta)  # `stored` is this tile's scratch copy
        if linear:
            return stored - self._delta(terms, r0, r1, None)
        estimate = stored - self._delta(terms, r0, r1, stored)
        return stored - self._delta(terms, r0, r1, estimate)

    # --- tiles --------------------------------------------------------------------------------
    def _read(self, r0: int, r1: int, role: str = "current", slot: str | None = None) -> torch.Tensor:
        return self._decode(self.matrix[r0:r1].to(self.device), role, slot)

    def _fix(self, stored: torch.Tensor, fix) -> torch.Tensor:
        if fix is not None:
            stored.view(-1)[fix[0].to(self.device, torch.int64)] = fix[1].to(self.device)
        return stored

    def base_rows(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact original rows (fp32, stored form), recovered from the current weights."""
        current = self._read(r0, r1, slot="base")
        if not self.old:
            return current, self.matrix[r0:r1].to(self.device)
        stored = self.codec.encode(self._before(current, self.old, self.old_linear, r0, r1), self.key, r0, "base")
        cols = self.matrix.shape[1]
        stored = self._fix(stored, self.journal.lookup(r0 * cols, r1 * cols) if self.journal else None)
        return self.codec.decode(stored, "base"), stored

    def merged_tiles(self, tile_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, fp32 rows as this call will write them, before rounding) per tile; writes nothing."""
        for r0, r1 in rows.tiles(self.matrix.shape[0], tile_rows):
            base, _ = self.base_rows(r0, r1)
            yield r0, base + self._delta(self.new, r0, r1, base)

    def prepare_norms(self, tile_rows: int) -> None:
        """Per-column DoRA norms over this weight's original rows, kept in the state for undo."""
        doras = rows.accumulate_dora_norms(self.new, self.matrix.shape[0], tile_rows,
                                           lambda r0, r1: self.base_rows(r0, r1)[0])
        for (dev_adapter, _), (original, _) in zip(self.new, self._sources[1]):
            if dev_adapter in doras:
                self.state.dora_norms[(self.key, id(original))] = dev_adapter.norms

    def run_tile(self, r0: int, r1: int) -> None:
        """Write rows [r0, r1) of the new stack; journal what undo and a rollback need, then write."""
        current_stored = self.matrix[r0:r1].to(self.device, copy=True) if self.old else None
        base, base_stored = self.base_rows(r0, r1)
        base_print = fingerprint(base_stored, r0)
        before_print = fingerprint(current_stored, r0) if self.old else base_print
        delta = self._delta(self.new, r0, r1, base, slot="delta")
        if self.new:  # base is not needed once the change is computed: merge into it
            out_stored = self._encode(base.add_(delta) if base is not base_stored else base + delta, r0, "new", "out")
        else:  # write the recovered original bits themselves (base + 0 would turn -0 into +0)
            out_stored = base_stored.clone()
        if self.new or self.old:  # recorded even without exact_undo: a failure must roll back exactly
            out = self._decode(out_stored, "new", slot="base")
            before = self._before(out, self.new, self.new_linear, r0, r1, delta if self.new_linear else None)
            if self.new:
                self._record(self.new_journal, before, base_stored, r0, "base")
            if self.old:
                undone = before + self._delta(self.old, r0, r1, before)
                self._record(self.undo_journal, undone, current_stored, r0, "current")
        self.matrix[r0:r1].copy_(out_stored)
        self.written.append((r0, r1))
        self.base_print += base_print  # only for rows written: a rollback checks exactly those
        self.before_print += before_print

    def _record(self, journal: Journal, estimate: torch.Tensor, truth: torch.Tensor, r0: int, role: str) -> None:
        recovered = self._encode(estimate, r0, role, slot="recovered")
        journal.add(r0 * self.matrix.shape[1], differing_bits(recovered, truth), truth.reshape(-1))

    def undo_tile(self, r0: int, r1: int) -> None:
        """Put back the bits this call replaced in rows [r0, r1)."""
        out = self._read(r0, r1, "new")
        estimate = self._before(out, self.new, self.new_linear, r0, r1)
        cols = self.matrix.shape[1]
        if self.old:
            estimate = estimate + self._delta(self.old, r0, r1, estimate)
        fix = (self.undo_journal if self.old else self.new_journal).lookup(r0 * cols, r1 * cols)
        role = "current" if self.old else "base"
        self.matrix[r0:r1].copy_(self._fix(self.codec.encode(estimate, self.key, r0, role), fix))

    def check_base(self, expected: torch.Tensor | None) -> None:
        """After the last tile: the original bits this call recovered must match the merge's fingerprint."""
        if expected is not None and self.old and not torch.equal(self.base_print.cpu(), expected):
            raise UndoError(
                f"{self.key!r}: taking the merged LoRAs out would not give back the original weight (its "
                "fingerprint differs): the change was computed differently than at merge time, or the weight was "
                "changed outside this pack. The weights were left as they were; reload the model from its file.",
                [self.key], unchanged=True,
            )

    def rollback(self) -> None:
        """Put back the bits this call replaced; each step is retried in smaller pieces when memory is short,
        and the result is checked against the fingerprint of the bits found (UndoError if it differs)."""
        if self.old is None:
            _retry_out_of_memory(self.load_terms, self.device)
        extent = self.written[-1][1] if self.written else 0
        while self.written:
            self._undo_range(*self.written[-1])
            self.written.pop()
        self.codec.rollback()
        if not torch.equal(self._print_of_rows(extent), self.before_print.cpu()):
            raise UndoError(f"{self.key!r}: rolling back did not give back its previous bits", [self.key], False)

    def _undo_range(self, r0: int, r1: int) -> None:
        try:
            self.undo_tile(r0, r1)
            return
        except BaseException as error:
            if not is_out_of_memory(error) or r1 - r0 == 1:
                raise
        _free_cache(self.device)
        mid = (r0 + r1) // 2
        self._undo_range(mid, r1)
        self._undo_range(r0, mid)

    def _print_of_rows(self, stop: int) -> torch.Tensor:
        """Fingerprint of rows [0, stop) as stored now, 256 rows at a time on the CPU (cannot run out of VRAM)."""
        total = torch.zeros(1, dtype=torch.int64)
        for r0, r1 in rows.tiles(stop, ROW_BLOCK):
            total += fingerprint(self.matrix[r0:r1].cpu(), r0)
        return total

    def finished_journal(self) -> Journal | None:
        return self.new_journal if self.exact_undo else None


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _retry_out_of_memory(step: Callable[[], None], device: torch.device) -> None:
    """Run `step`; after an out-of-memory error free the allocator's cache and run it once more."""
    try:
        step()
    except BaseException as error:
        if not is_out_of_memory(error):
            raise
        _free_cache(device)
        step()


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


def _run_job(job: _KeyJob, budget: int, options: MergeOptions, report: MergeReport, expected) -> None:
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


def _roll_back(jobs: list[_KeyJob], error: BaseException) -> None:
    """Undo every job (latest first); UndoError names those whose bits could not be put back."""
    failed = []
    for job in reversed(jobs):
        try:
            with threads_of(job.arithmetic):
                job.rollback()
        except BaseException:  # keep rolling the others back
            failed.append(job.key)
    if failed:
        raise UndoError(
            f"{' '.join(str(error).split())[:200] or type(error).__name__}; then rolling back failed for "
            f"{len(failed)} weights ({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}), which may hold "
            "wrong values now. Reload the model from its file.",
            failed, unchanged=False,
        ) from error


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
    jobs: list[_KeyJob] = []
    workspace = rows.Workspace()  # one set of tile buffers for every weight of this call
    done = 0
    try:
        for key in keys:
            weight = weights[key]
            old, new = old_terms.get(key, []), new_terms.get(key, [])
            arithmetic = _arithmetic_for(key, weight, state, bool(old), options)
            codec = options.codec_for(key, weight) if options.codec_for else Codec(weight.dtype)
            with threads_of(arithmetic):
                jobs.append(_KeyJob(key, weight, old, new, state.journals.get(key), codec, arithmetic, new_state,
                                    options.exact_undo, workspace))
                _run_job(jobs[-1], budget, options, report, state.fingerprints.get(key))
            done += weight.numel()
            if options.progress is not None:
                options.progress(done, total)
    except BaseException as error:
        _roll_back(jobs, error)
        raise
    _finish(new_state, jobs, new_terms, report)
    return new_state


def _finish(new_state: MergeState, jobs: list[_KeyJob], new_terms, report: MergeReport) -> None:
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
