"""The oracle: run the public API on one artifact folder and classify what happened.

Outcomes (exactly one per case; the part before ``:`` is the *kind*):

* ``rejected:<code>`` — ``validate`` reported errors (``<code>`` is the first one's finding code),
  or raised a ``LaplaceHubError`` (its code), and the reader and the CLI agreed.
* ``rejected_valid:<code>`` — as ``rejected``, for a case that SPEC.md §8.2 calls valid (a large
  case of a valid family, ``large.py``): the validator refuses what the spec accepts.
* ``accepted_safe`` — ``validate`` accepted it, and everything below held.
* ``accepted_unsafe:<why>`` — something a consumer relies on broke although no exception escaped
  (or the reader and the validator disagree); ``<why>`` is one of :data:`UNSAFE_REASONS`.
* ``crash:<ExceptionType>@<file:line>`` — an exception that is not a ``LaplaceHubError`` escaped
  ``validate``, ``Artifact.open``, ``block``/``quad``/``dense``, ``merge`` or the CLI; the site is the
  deepest frame inside ``laplace_hub``. CLI failures without an exception read
  ``crash:cli_exit_<n>@<command>`` or ``crash:cli_internal_error@<command>``.
* ``hang`` (over the time limit), ``memory`` (an allocation failed under the memory limit, or the
  runner saw the peak RSS grow by more than 1 GiB), ``harness_error:...`` (a bug of this harness).

For an accepted artifact the oracle opens it with checksums and values checked, decodes every
module's block (float32, the default), evaluates the penalty ``block.quad(Δ)`` — a LoRA pair block
as ``quad(δA, δB)`` — on 8 random N(0, 1) updates and on every eigenvector of the block's dense
float64 matrix, requires it finite and ``>= -1e-5·λ_max(P)·‖Δ‖²``, requires ``λ_min(P) >=
-1e-5·λ_max(P)``, checks that ``merge(a, a)`` (when merge accepts it) saved and re-opened gives
exactly twice the penalty, requires every penalty to equal the float64 quadratic form of the
stored numbers (``fidelity.py``: SPEC.md §8.3's decode, read from the raw files) within
``1e-5·λ_max(P)·‖Δ‖²``, also along the flattest directions of each stored factor, and runs
``laplace-hub validate --json``, ``validate`` and ``inspect``
in-process. Only the public API is used: ``validate``, ``Artifact``, ``merge``, ``LaplaceHubError``
and ``laplace_hub.cli.main``.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import laplace_hub
from laplace_hub.artifact import Artifact, merge
from laplace_hub.errors import LaplaceHubError
from laplace_hub.validate import validate
from tests.fuzz import fidelity

PACKAGE = Path(laplace_hub.__file__).resolve().parent
TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2**30
REL_TOL = 1e-5  # penalty >= -REL_TOL·λ_max·‖Δ‖², λ_min >= -REL_TOL·λ_max
MERGE_RTOL = 1e-4
N_RANDOM = 8
DENSE_LIMIT = 2048  # dense P only up to this side (tiny vectors are ~24)
MAX_EIG_DELTAS = 64
MAX_DELTA_NUMEL = 2**22
DELTA_SEED = 20240601

BAD_KINDS = frozenset({"crash", "accepted_unsafe", "rejected_valid", "hang", "memory", "harness_error"})
UNSAFE_REASONS = (
    "reader_disagrees",  # validate accepted, Artifact.open / block / quad / dense raised a LaplaceHubError
    "non_finite_penalty",  # quad(Δ) is NaN or inf for a finite Δ
    "negative_penalty",  # quad(Δ) < -1e-5·λ_max·‖Δ‖²
    "non_finite_block",  # the decoded block holds NaN or inf (e.g. float64 1e300 read as float32)
    "indefinite",  # λ_min(P) < -1e-5·λ_max(P)
    "quad_dense_mismatch",  # quad(Δ) disagrees with vec(Δ)ᵀ P vec(Δ) from dense()
    "unfaithful",  # quad(Δ) differs from the float64 form of the stored numbers (SPEC.md §8.3; fidelity.py)
    "quad_not_scalar",
    "dense_shape",  # dense() is not (n, n) for the module's parameter count
    "merge_unreadable",  # merge(a, a) accepted, saving it raised a LaplaceHubError
    "merge_invalid",  # the saved merge does not re-open (checksums + values) or decode
    "merge_not_2x",  # merge(a, a) does not give exactly twice the penalty
    "cli_disagrees",  # `laplace-hub validate` exit status differs from validate().valid
    "cli_inspect_refuses",  # `laplace-hub inspect` exits 1 on an artifact validate accepts
    "open_accepts_invalid",  # validate rejected, Artifact.open(verify_checksums, check_values) did not
)


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case (a BaseException, so that library ``except Exception`` cannot eat it)."""


@dataclass
class Result:
    outcome: str
    stage: str | None = None
    details: list[str] = field(default_factory=list)
    traceback: str | None = None
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    findings: list[str] = field(default_factory=list)  # every crash and unsafe outcome seen, primary first

    @property
    def kind(self) -> str:
        return self.outcome.split(":")[0]

    @property
    def bad(self) -> bool:
        return self.kind in BAD_KINDS

    def summary(self, max_details: int = 8) -> str:
        lines = [f"outcome {self.outcome}" + (f" (stage {self.stage})" if self.stage else "")]
        lines += [f"  {d}" for d in self.details[:max_details]]
        if len(self.details) > max_details:
            lines.append(f"  … {len(self.details) - max_details} more")
        if self.traceback:
            lines.append("  traceback (last lines):")
            lines += ["    " + line for line in self.traceback.rstrip().splitlines()[-12:]]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "stage": self.stage,
            "details": self.details[:20],
            "traceback": self.traceback,
            "seconds": round(self.seconds, 4),
            "peak_rss_mib": self.peak_rss_mib,
            "findings": self.findings,
        }


class _Crash(Exception):
    def __init__(self, stage: str, outcome: str, error: BaseException | None, message: str) -> None:
        super().__init__(outcome)
        self.stage, self.outcome, self.error, self.message = stage, outcome, error, message


class _Memory(Exception):
    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(stage)
        self.stage, self.error = stage, error


def is_memory_error(error: BaseException) -> bool:
    """An allocation or mmap that failed (under RLIMIT_AS in the runner's workers)."""
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOMEM:
        return True
    text = str(error).lower()
    return any(
        s in text
        for s in (
            "can't allocate memory",
            "cannot allocate memory",
            "out of memory",
            "os error 12",
            "failed to allocate",
        )
    )


def caused_by_memory(error: BaseException) -> bool:
    """A library error raised because an allocation or mmap failed (its cause chain holds one)."""
    seen: set[int] = set()
    cause = error.__cause__ or error.__context__
    while cause is not None and id(cause) not in seen:
        if is_memory_error(cause):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return is_memory_error(error)


def crash_site(error: BaseException) -> str:
    """``path:line`` of the deepest frame inside the laplace_hub package (else the deepest frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    inside = [f for f in frames if _in_package(f.filename)]
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return "?"
    path = Path(frame.filename)
    try:
        rel = str(path.resolve().relative_to(PACKAGE.parent))
    except (ValueError, OSError):
        rel = path.name
    return f"{rel}:{frame.lineno}"


def _in_package(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(PACKAGE)
    except OSError:
        return False


def _lib(stage: str, fn: Callable[[], Any]) -> Any:
    """Call the library: LaplaceHubError passes through, anything else becomes a crash (or memory).

    An exception with no frame inside laplace_hub was raised by the call itself (a wrong keyword,
    say): that is a ``harness_error``, not a crash of the library.
    """
    try:
        return fn()
    except LaplaceHubError as e:
        if caused_by_memory(e):  # e.g. an mmap refused under the runner's address-space limit
            raise _Memory(stage, e) from e
        raise
    except Exception as e:
        if is_memory_error(e):
            raise _Memory(stage, e) from e
        inside = any(_in_package(f.filename) for f in traceback.extract_tb(e.__traceback__))
        kind = "crash" if inside else "harness_error"
        outcome = f"{kind}:{type(e).__name__}@{crash_site(e)}"
        raise _Crash(stage, outcome, e, f"{type(e).__name__}: {str(e)[:300]}") from e


# The caller's byte budget (SPEC.md §8.1): a sparse file declaring more is refused before it is
# hashed or mapped; the default (256 GiB) would let a sparse 50 GiB file be hashed for a minute.
BUDGET = 256 * 2**20


def open_checked(path: Path) -> Artifact:
    """``Artifact.open`` with checksums and values verified, within the budget."""
    return Artifact.open(path, verify_checksums=True, check_values=True, max_bytes=BUDGET)


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`CaseTimeout` after ``seconds`` (main thread only; a no-op elsewhere)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- the checks ----------------------------------------------------------------------------------


@dataclass
class _State:
    details: list[str] = field(default_factory=list)
    unsafe: list[tuple[str, str]] = field(default_factory=list)
    crashes: list[_Crash] = field(default_factory=list)

    def flag(self, reason: str, detail: str) -> None:
        assert reason in UNSAFE_REASONS, reason
        self.unsafe.append((reason, detail))
        self.details.append(f"UNSAFE {reason}: {detail}")

    def unsafe_outcome(self) -> str | None:
        if not self.unsafe:
            return None
        found = {r for r, _ in self.unsafe}
        return "accepted_unsafe:" + next(r for r in UNSAFE_REASONS if r in found)

    @contextmanager
    def stage(self) -> Iterator[None]:
        """A group of checks: a crash inside ends the group, is recorded, and later groups still run."""
        try:
            yield
        except _Crash as c:
            self.crashes.append(c)
            self.details.append(f"CRASH in {c.stage}: {c.outcome}: {c.message}")


def run_oracle(folder: Path, work: Path) -> Result:
    """Classify one artifact folder (``work`` is a scratch folder for the merge).

    Every check group runs even after an earlier one crashed, so that one crash (say in merge) does
    not hide another (say in the CLI); the primary outcome is the first crash, else the most
    severe unsafe reason, else rejected / accepted_safe. ``Result.findings`` lists them all.
    """
    state = _State()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verdict = _run(Path(folder), Path(work), state)
    except _Memory as m:
        return Result("memory", m.stage, [*state.details, f"{type(m.error).__name__}: {str(m.error)[:300]}"])
    except MemoryError as e:
        return Result("memory", None, [*state.details, f"MemoryError: {e}"])
    except Exception as e:  # the oracle's own code failed: a bug of this harness, not of the library
        if is_memory_error(e):
            return Result("memory", None, [*state.details, f"{type(e).__name__}: {str(e)[:300]}"])
        tb = "".join(traceback.format_exception(e))
        return Result(f"harness_error:{type(e).__name__}@{crash_site(e)}", "oracle", state.details, tb)
    findings = list(dict.fromkeys(c.outcome for c in state.crashes))
    findings += [f"accepted_unsafe:{r}" for r in dict.fromkeys(r for r, _ in state.unsafe)]
    if state.crashes:
        first = state.crashes[0]
        tb = "".join(traceback.format_exception(first.error)) if first.error is not None else None
        return Result(first.outcome, first.stage, state.details, tb, findings=findings)
    return Result(state.unsafe_outcome() or verdict, None, state.details, findings=findings)


def _run(folder: Path, work: Path, state: _State) -> str:
    """The verdict without crashes and unsafe findings: ``rejected:<code>`` or ``accepted_safe``."""
    code: str | None = None
    with state.stage():
        try:
            report = _lib("validate", lambda: validate(folder, checksums=True, values=True, max_bytes=BUDGET))
            if not report.valid:
                code = report.errors[0].code
                state.details.append(
                    "validate: " + "; ".join(f"{f.code} at {str(f.location)[:80]!r}" for f in report.errors[:4])
                )
        except LaplaceHubError as e:  # allowed: every outcome is a Report or a LaplaceHubError
            code = e.code or type(e).__name__
            state.details.append(f"validate raised {type(e).__name__}: {str(e)[:200]}")
    if state.crashes:
        with state.stage():
            _check_cli(folder, valid=None, state=state)
        return "crash"
    if code is not None:
        with state.stage():
            try:
                _lib("open", lambda: open_checked(folder))
                state.flag("open_accepts_invalid", f"Artifact.open(checksums, values) accepted it ({code})")
            except LaplaceHubError:
                pass
        with state.stage():
            _check_cli(folder, valid=False, state=state)
        return f"rejected:{code}"
    _check_reader(folder, work, state)
    with state.stage():
        _check_cli(folder, valid=True, state=state)
    return "accepted_safe"


@dataclass
class _Evaluated:
    deltas: list[list[torch.Tensor]]
    penalties: list[float]
    lam_max: float | None
    radius: float | None  # max |λ(P)|, the scale of rounding errors


def _check_reader(folder: Path, work: Path, state: _State) -> None:
    evaluated: dict[str, _Evaluated] = {}
    art: Artifact | None = None
    with state.stage():
        try:
            art = _lib("open", lambda: open_checked(folder))
        except LaplaceHubError as e:
            state.flag("reader_disagrees", f"Artifact.open: {type(e).__name__}: {str(e)[:200]}")
            return
        _check_penalties(art, state, evaluated)
    if art is not None:
        with state.stage():
            _check_merge(art, folder, work, evaluated, state)


def _check_penalties(art: Artifact, state: _State, evaluated: dict[str, _Evaluated]) -> None:
    manifest = art.manifest
    assert art.path is not None
    stored = fidelity.raw_tensors(art.path)
    lora = getattr(manifest.parameterization, "kind", None) == "lora"
    rank = int(manifest.parameterization.rank) if lora else 0
    gen = torch.Generator().manual_seed(DELTA_SEED)
    for name, entry in manifest.modules.items():
        d_out, d_in = (int(d) for d in entry.shape)
        shapes = [(rank, d_in), (d_out, rank)] if lora else [(d_out, d_in)]
        n = sum(a * b for a, b in shapes)
        try:
            block = _lib("block", lambda name=name: art.block(name))
        except LaplaceHubError as e:
            state.flag("reader_disagrees", f"block({name!r}): {type(e).__name__}: {str(e)[:200]}")
            continue
        if n > MAX_DELTA_NUMEL:
            state.details.append(f"{name}: {n} parameters, penalty not evaluated")
            continue
        deltas = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(N_RANDOM)]
        labels = [f"random Δ#{i}" for i in range(N_RANDOM)]
        reference = fidelity.module_reference(art.path, name, stored)
        deltas += [[d.to(torch.float32) for d in flat] for flat in reference.flattest]
        labels += [f"flattest stored direction #{i}" for i in range(len(reference.flattest))]
        lam_max: float | None = None
        radius: float | None = None
        sym: torch.Tensor | None = None
        if n <= DENSE_LIMIT:
            try:
                dense = _lib("dense", lambda block=block: block.to(dtype=torch.float64).dense())
            except LaplaceHubError as e:
                state.flag("reader_disagrees", f"{name}: dense(): {type(e).__name__}: {str(e)[:200]}")
                continue
            if tuple(dense.shape) != (n, n):
                state.flag("dense_shape", f"{name}: dense() is {tuple(dense.shape)}, the module has {n} parameters")
                continue
            if not bool(torch.isfinite(dense).all()):
                bad = int((~torch.isfinite(dense)).sum())
                state.flag("non_finite_block", f"{name}: the float32 block's dense() has {bad} non-finite entries")
            else:
                sym = (dense + dense.T) / 2
                w, v = torch.linalg.eigh(sym)
                lam_min, lam_max = float(w[0]), max(float(w[-1]), 0.0)
                radius = max(abs(lam_min), lam_max)
                if lam_min < -REL_TOL * lam_max or (lam_max == 0.0 and lam_min < 0.0):
                    ratio = lam_min / lam_max if lam_max else float("-inf")
                    state.flag(
                        "indefinite", f"{name}: λ_min {lam_min:.4g}, λ_max {lam_max:.4g} (λ_min/λ_max {ratio:.3g})"
                    )
                for k in range(min(n, MAX_EIG_DELTAS)):
                    deltas.append(_split(v[:, k], shapes))
                    labels.append(f"eigenvector #{k} (λ {float(w[k]):.3g})")
        penalties: list[float] = []
        for delta, label in zip(deltas, labels, strict=True):
            try:
                q = _lib("quad", lambda block=block, delta=delta: block.quad(*delta))
            except LaplaceHubError as e:
                state.flag("reader_disagrees", f"{name}: quad: {type(e).__name__}: {str(e)[:200]}")
                break
            if not isinstance(q, torch.Tensor) or q.numel() != 1:
                state.flag("quad_not_scalar", f"{name}: quad returned {type(q).__name__} {getattr(q, 'shape', '')}")
                break
            value = float(q)
            penalties.append(value)
            norm2 = sum(float(d.double().square().sum()) for d in delta)
            if not math.isfinite(value):
                state.flag("non_finite_penalty", f"{name}: penalty {value} at {label}")
                continue
            scale = lam_max if lam_max is not None else reference.lam_max
            if value < -REL_TOL * scale * norm2:
                state.flag(
                    "negative_penalty",
                    f"{name}: penalty {value:.4g} < -1e-5·λ_max·‖Δ‖² = {-REL_TOL * scale * norm2:.3g} at {label}",
                )
            if sym is not None and radius is not None:
                vec = torch.cat([d.double().reshape(-1) for d in delta])
                from_dense = float(vec @ sym @ vec)
                # the floor: float32 subnormals (a penalty of 1e-46 read as 0 is no harm)
                if abs(value - from_dense) > (1e-3 * radius + 1e-35) * norm2:
                    state.flag("quad_dense_mismatch", f"{name}: quad {value:.6g} vs dense {from_dense:.6g} at {label}")
            exact = reference.penalty(delta)
            if not abs(value - exact) <= (REL_TOL * reference.lam_max + 1e-35) * norm2:
                state.flag(
                    "unfaithful",
                    f"{name}: quad {value:.8g}, the stored numbers give {exact:.8g} "
                    f"(error {abs(value - exact) / (reference.lam_max * norm2 or 1):.3g}·λ_max·‖Δ‖²) at {label}",
                )
        evaluated[name] = _Evaluated(deltas[:N_RANDOM], penalties[:N_RANDOM], lam_max, radius)


def _split(vector: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    out, at = [], 0
    for a, b in shapes:
        out.append(vector[at : at + a * b].reshape(a, b).to(torch.float32).contiguous())
        at += a * b
    return out


def _check_merge(art: Artifact, folder: Path, work: Path, evaluated: dict[str, _Evaluated], state: _State) -> None:
    """merge(a, a) saved and re-opened gives 2× the penalty.

    ``merge(a, a)`` with the very same object comes first; if saving it crashes, the crash is
    recorded and the 2× check goes on with ``merge(a, b)``, ``b`` a second open of the same folder.
    """
    try:
        merged = _lib("merge", lambda: merge(art, art))
    except LaplaceHubError as e:
        state.details.append(f"merge(a, a) refused: {type(e).__name__}: {str(e)[:160]}")
        return
    out = work / "merged"
    saved = False
    with state.stage():
        try:
            _lib("merge_save", lambda: merged.save(out, overwrite=True))
            saved = True
        except LaplaceHubError as e:
            state.flag("merge_unreadable", f"merge(a, a).save: {type(e).__name__}: {str(e)[:200]}")
            return
    if not saved:  # the save crashed (recorded): merge with a second, independent open of the folder
        try:
            twin = _lib("merge_reopen", lambda: open_checked(folder))
            merged_twin = _lib("merge", lambda: merge(art, twin))
            _lib("merge_save", lambda: merged_twin.save(out, overwrite=True))
        except LaplaceHubError as e:
            state.flag("merge_unreadable", f"merge(a, open(a)).save: {type(e).__name__}: {str(e)[:200]}")
            return
    try:
        again = _lib("merge_open", lambda: open_checked(out))
    except LaplaceHubError as e:
        state.flag("merge_invalid", f"re-opening merge(a, a): {type(e).__name__}: {str(e)[:200]}")
        return
    for name, ev in evaluated.items():
        try:
            block = _lib("merge_block", lambda name=name: again.block(name))
        except LaplaceHubError as e:
            state.flag("merge_invalid", f"merge(a, a).block({name!r}): {type(e).__name__}: {str(e)[:200]}")
            continue
        for i, (delta, p) in enumerate(zip(ev.deltas, ev.penalties, strict=False)):
            if not math.isfinite(p):
                continue
            try:
                q = float(_lib("merge_quad", lambda block=block, delta=delta: block.quad(*delta)))
            except LaplaceHubError as e:
                state.flag("merge_invalid", f"merge(a, a) {name}: quad: {type(e).__name__}: {str(e)[:200]}")
                break
            norm2 = sum(float(d.double().square().sum()) for d in delta)
            atol = (2 * REL_TOL * (ev.radius or 0.0) + 1e-35) * norm2  # + float32 subnormal floor
            if not abs(q - 2 * p) <= MERGE_RTOL * abs(2 * p) + atol:
                ratio = q / p if p else float("inf")
                state.flag(
                    "merge_not_2x", f"{name}: merge(a, a) gives {q:.6g}, 2× a is {2 * p:.6g} (×{ratio:.4g}) at Δ#{i}"
                )
                break


def _cli(args: list[str]) -> tuple[int, str, bool]:
    """``laplace_hub.cli.main(args)`` in-process, stdout/stderr as strict UTF-8 like a real terminal.

    ``LAPLACE_HUB_DEBUG=1`` makes the CLI re-raise instead of printing "internal error", so that a
    crash carries its site; a re-raised LaplaceHubError is the CLI's ordinary exit 1 (one line on
    stderr, nothing on stdout). Returns (exit status, stdout, whether it ended in a library error).
    """
    from laplace_hub.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    old = os.environ.get("LAPLACE_HUB_DEBUG")
    os.environ["LAPLACE_HUB_DEBUG"] = "1"
    stage = f"cli {args[0]}" + (" --json" if "--json" in args else "")
    known_error = False
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(args)
    except LaplaceHubError as e:
        if caused_by_memory(e):
            raise _Memory(stage, e) from e
        code, known_error = 1, True
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    except Exception as e:
        if is_memory_error(e):
            raise _Memory(stage, e) from e
        raise _Crash(
            stage, f"crash:{type(e).__name__}@{crash_site(e)}", e, f"{stage}: {type(e).__name__}: {e}"[:400]
        ) from e
    finally:
        if old is None:
            os.environ.pop("LAPLACE_HUB_DEBUG", None)
        else:
            os.environ["LAPLACE_HUB_DEBUG"] = old
    text = out.buffer.getvalue().decode("utf-8", "replace")  # type: ignore[attr-defined]
    text_err = err.buffer.getvalue().decode("utf-8", "replace")  # type: ignore[attr-defined]
    if not isinstance(code, int) or code not in (0, 1):
        raise _Crash(stage, f"crash:cli_exit_{code}@{args[0]}", None, f"{stage} exited {code}: {text_err[-300:]}")
    if "Traceback" in text + text_err or "internal error" in text + text_err:
        raise _Crash(stage, f"crash:cli_internal_error@{args[0]}", None, f"{stage}: {(text + text_err)[-300:]}")
    return code, text, known_error


def _check_cli(folder: Path, *, valid: bool | None, state: _State) -> None:
    """The three commands; ``valid=None`` when validate() itself crashed (only look for crashes)."""
    code, text, known_error = _cli(["validate", str(folder), "--json", "--max-bytes", str(BUDGET)])
    if not known_error:  # a library error is one line on stderr; otherwise stdout is the report
        try:
            report = json.loads(text)
            if not isinstance(report, dict) or report.get("valid") is not (code == 0):
                raise ValueError("valid flag and exit status differ")
        except ValueError as e:
            message = f"{e}: {text[:200]!r}"
            raise _Crash("cli validate --json", "crash:cli_bad_json@validate", None, message) from None
    if valid is not None and (code == 0) != valid:
        state.flag("cli_disagrees", f"`laplace-hub validate --json` exits {code}, validate().valid is {valid}")
    code_text, _, _ = _cli(["validate", str(folder), "--max-bytes", str(BUDGET)])
    if code_text != code:
        state.flag("cli_disagrees", f"`laplace-hub validate` exits {code_text}, with --json {code}")
    code_inspect, _, _ = _cli(["inspect", str(folder), "--max-bytes", str(BUDGET)])
    if valid and code_inspect != 0:
        state.flag("cli_inspect_refuses", f"`laplace-hub inspect` exits {code_inspect} on an accepted artifact")


def run_case(folder: Path, work: Path, timeout: float | None = TIMEOUT_S, expect_valid: bool = False) -> Result:
    """:func:`run_oracle` under a time limit (``hang`` past it); ``rejected_valid`` refuses what SPEC.md accepts."""
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            result = run_oracle(folder, work)
    except CaseTimeout as e:
        result = Result(
            "hang", None, [f"over {timeout:g} s, at {crash_site(e)}"], "".join(traceback.format_exception(e))
        )
    result.seconds = time.perf_counter() - start
    if expect_valid and result.kind == "rejected":
        result.outcome = result.outcome.replace("rejected:", "rejected_valid:", 1)
    return result
