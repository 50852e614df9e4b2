"""Fuzz the artifact reader and validator with mutated conformance vectors, in worker processes.

    python benchmarks/fuzz_artifacts.py --cases 100000 --workers 4 --seed 0 --out docs/fuzz-results.json
    python benchmarks/fuzz_artifacts.py --cases 300 --workers 2            # a couple of minutes
    python benchmarks/fuzz_artifacts.py --repro 17                         # one case, in-process, verbose
    python benchmarks/fuzz_artifacts.py --repro 17 --keep /tmp/case17      # ... and keep its folder
    python benchmarks/fuzz_artifacts.py --cases 2000 --versions 1.0,1.1    # only those vectors (pass the
                                                                           # same --versions to --repro)
    python benchmarks/fuzz_artifacts.py --cases 100000 --large 0.03        # 3 % of cases at sides 512-1024

Case ``i`` of a run has the seed ``seed * 1_000_000 + i``; that seed alone rebuilds the case
(``tests/fuzz/mutate.py``), so every crash site and unsafe reason comes with a reproducer seed.

Each case runs in a long-lived worker process under three guards: an in-worker alarm turns a case
over ``--timeout`` seconds into ``hang``; a watchdog in the parent kills and restarts a worker whose
case runs ``--timeout`` + 15 s (stuck in C, where the alarm cannot interrupt) and records ``hang``;
workers run with RLIMIT_AS at their size after import + 1.5 GiB, and a case whose allocation fails
or whose peak RSS grows by more than ``--memory-mib`` (VmHWM, reset before each case) is ``memory``.
A worker that dies (a signal) is recorded as ``crash:SIG...`` and restarted. All case folders live
under one temp root, removed at the end.

Prints and writes (``--out``) the counts per outcome, per outcome kind × mutation family and
mutation, every distinct crash site and unsafe reason (counting a case for every finding it had,
not only its primary outcome) with the case of fewest mutations as reproducer.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: a laplace_hub on PYTHONPATH (e.g. another checkout) still wins

SEED_STRIDE = 1_000_000
WATCHDOG_GRACE_S = 15.0
MEMORY_HEADROOM = int(1.5 * 2**30)


# --- memory measurement (Linux /proc) ------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0); False where /proc/self/clear_refs is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def limit_address_space(headroom: int = MEMORY_HEADROOM) -> None:
    import resource

    size = _status_kib("VmSize") * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def rmtree(path: Path) -> None:
    def retry(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=retry)


# --- one case --------------------------------------------------------------------------------------


def run_one(
    seed: int, work: Path, timeout: float, memory_bytes: int, keep: bool = False, draw: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build and check one case in this process; returns ``{"case": ..., "result": ...}``.

    ``draw`` holds ``make_case``'s options of the run (``versions``, ``large``): a seed rebuilds its
    case only with the same ones.
    """
    from tests.fuzz import mutate, oracle

    can_reset = reset_peak_rss()
    base_rss = _status_kib("VmRSS") * 1024
    base_hwm = _status_kib("VmHWM") * 1024
    case = None
    try:
        try:
            case = mutate.make_case(work, seed=seed, **(draw or {}))
        except mutate.HarnessError as e:
            result = oracle.Result(f"harness_error:mutate@{type(e.__cause__ or e).__name__}", "mutate", [str(e)])
        except MemoryError as e:
            result = oracle.Result("memory", "mutate", [f"MemoryError while building the case: {e}"])
        except Exception as e:  # e.g. the conformance folder changed while it was copied
            result = oracle.Result(f"harness_error:mutate@{type(e).__name__}", "mutate", [f"{type(e).__name__}: {e}"])
        else:
            result = oracle.run_case(case.folder, case.work, timeout, expect_valid=case.expect_valid)
        # with a reset high-water mark: the case's peak over the RSS it started at; without one,
        # only what the case added above the worker's earlier peak (an underestimate)
        peak = max(0, _status_kib("VmHWM") * 1024 - (base_rss if can_reset else base_hwm))
        result.peak_rss_mib = round(peak / 2**20, 1)
        if peak > memory_bytes and result.kind != "harness_error":
            result.details.insert(0, f"peak RSS grew by {peak / 2**20:.0f} MiB (was {result.outcome})")
            result.outcome = "memory"
    finally:
        if not keep:
            rmtree(work)
    return {"seed": seed, "case": case.to_json() if case else {"seed": seed}, "result": result.to_json()}


# --- workers ---------------------------------------------------------------------------------------


def worker_main(conn: Connection, wid: int, root: str, timeout: float, memory_bytes: int, draw: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    import torch

    torch.set_num_threads(1)
    from tests.fuzz import mutate, oracle  # noqa: F401  (imported before the address-space limit)

    faults = open(Path(root) / f"worker-{wid}.faults", "w")
    faulthandler.enable(faults)
    limit_address_space()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            seed = conn.recv()
        except EOFError:
            break
        if seed is None:
            break
        faulthandler.dump_traceback_later(timeout + WATCHDOG_GRACE_S / 2, exit=False, file=faults)
        record = run_one(seed, Path(root) / f"case-{seed}", timeout, memory_bytes, draw=draw)
        faulthandler.cancel_dump_traceback_later()
        conn.send(("result", record))


class Worker:
    def __init__(self, ctx: Any, wid: int, root: Path, timeout: float, memory_bytes: int, draw: dict[str, Any]) -> None:
        self.wid, self.root = wid, root
        parent, child = ctx.Pipe()
        self.conn: Connection = parent
        target_args = (child, wid, str(root), timeout, memory_bytes, draw)
        self.proc = ctx.Process(target=worker_main, args=target_args, daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.seed: int | None = None
        self.started = 0.0

    def assign(self, seed: int) -> None:
        self.seed, self.started = seed, time.monotonic()
        self.conn.send(seed)

    def faults_tail(self, lines: int = 25) -> str:
        path = self.root / f"worker-{self.wid}.faults"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


_FRAME = re.compile(r'File "([^"]*laplace_hub/[^"]+)", line (\d+)')


def native_site(faults: str) -> str:
    """The innermost laplace_hub frame of a faulthandler dump (most recent call first)."""
    match = _FRAME.search(faults)
    if not match:
        return "native"
    path = match[1]
    return f"{path[path.rfind('laplace_hub/') :]}:{match[2]}"


def lost_record(seed: int, outcome: str, detail: str, faults: str) -> dict[str, Any]:
    return {
        "seed": seed,
        "case": {"seed": seed, "vector": "?", "mutations": ["?"], "refreshed": None, "lost": True},
        "result": {
            "outcome": outcome,
            "stage": "worker",
            "details": [detail],
            "traceback": faults or None,
            "seconds": None,
            "peak_rss_mib": None,
            "findings": [outcome],
        },
    }


# --- aggregation ---------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.per_family: dict[str, Counter[str]] = defaultdict(Counter)
        self.per_mutation: dict[str, Counter[str]] = defaultdict(Counter)
        self.per_vector: dict[str, Counter[str]] = defaultdict(Counter)
        self.sites: dict[str, dict[str, Any]] = {}  # crash sites, unsafe reasons, hang, memory
        self.seconds: list[float] = []
        self.done = 0

    def add(self, record: dict[str, Any]) -> None:
        from tests.fuzz.mutate import base_name, family_of

        result, case = record["result"], record["case"]
        outcome = result["outcome"]
        kind = outcome.split(":")[0]
        self.done += 1
        self.outcomes[outcome] += 1
        self.kinds[kind] += 1
        if result.get("seconds") is not None:
            self.seconds.append(result["seconds"])
        mutations = case.get("mutations") or []
        for family in sorted({family_of(m) for m in mutations} or {"none"}):
            self.per_family[family][kind] += 1
        for name in sorted({base_name(m) for m in mutations} or {"none"}):
            self.per_mutation[name][kind] += 1
        self.per_vector[case.get("vector", "?")][kind] += 1
        findings = list(result.get("findings") or [])
        if kind in ("hang", "memory", "harness_error") and outcome not in findings:
            findings.insert(0, outcome)
        for finding in dict.fromkeys(findings):
            entry = self.sites.setdefault(finding, {"finding": finding, "count": 0, "primary": 0, "repro": None})
            entry["count"] += 1
            entry["primary"] += finding == outcome
            best = entry["repro"]
            key = (len(mutations), record["seed"])
            if best is None or key < (len(best["mutations"]), best["seed"]):
                details = result.get("details") or []
                short = finding.split("@")[0].split(":")[-1]
                detail = next((d for d in details if finding in d), None) or next(
                    (d for d in details if short in d), None
                )
                entry["repro"] = {
                    "seed": record["seed"],
                    "vector": case.get("vector"),
                    "mutations": mutations,
                    "refreshed": case.get("refreshed"),
                    "primary_outcome": outcome,
                    "stage": result.get("stage"),
                    "detail": (detail or (details or [""])[-1])[:400],
                }

    def summary(self) -> dict[str, Any]:
        def listed(prefixes: tuple[str, ...]) -> list[dict[str, Any]]:
            rows = [v for k, v in self.sites.items() if k.startswith(prefixes)]
            return sorted(rows, key=lambda r: (-r["count"], r["finding"]))

        seconds = sorted(self.seconds)
        return {
            "cases": self.done,
            "outcome_kinds": dict(self.kinds.most_common()),
            "outcomes": dict(self.outcomes.most_common()),
            "crash_sites": listed(("crash:",)),
            "unsafe_reasons": listed(("accepted_unsafe:",)),
            "hangs": listed(("hang",)),
            "memory": listed(("memory",)),
            "harness_errors": listed(("harness_error",)),
            "per_family": {k: dict(v.most_common()) for k, v in sorted(self.per_family.items())},
            "per_mutation": {k: dict(v.most_common()) for k, v in sorted(self.per_mutation.items())},
            "per_vector": {k: dict(v.most_common()) for k, v in sorted(self.per_vector.items())},
            "case_seconds": {
                "median": seconds[len(seconds) // 2] if seconds else None,
                "p99": seconds[int(len(seconds) * 0.99)] if seconds else None,
                "max": seconds[-1] if seconds else None,
            },
        }


def _digest(vectors: list[str]) -> str:
    import hashlib

    from tests.fuzz.mutate import CONFORMANCE

    digest = hashlib.sha256()
    for vector in vectors:
        for path in sorted((CONFORMANCE / vector).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(CONFORMANCE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def library_info() -> dict[str, Any]:
    """Which laplace_hub the workers import (same sys.path): its path, and its checkout's commit and dirty flag."""
    import importlib.util

    spec = importlib.util.find_spec("laplace_hub")
    if spec is None or spec.origin is None:
        return {"error": "laplace_hub not importable"}
    info: dict[str, Any] = {"path": spec.origin}
    folder = Path(spec.origin).parent.parent
    for args, key in ((["rev-parse", "HEAD"], "commit"), (["status", "--porcelain", "--", "laplace_hub"], "dirty")):
        try:
            value = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
            info[key] = value.stdout.strip() if key == "commit" else bool(value.stdout.strip())
            if value.returncode:
                info[key] = None
        except (OSError, subprocess.SubprocessError):
            info[key] = None
    return info


# --- the run ---------------------------------------------------------------------------------------


class Runner:
    """Feeds seeds to workers, collects results, and replaces workers that hang or die."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root = args, root
        self.ctx = mp.get_context("spawn")
        self.memory_bytes = int(args.memory_mib * 2**20)
        self.pending = [args.seed * SEED_STRIDE + i for i in reversed(range(args.cases))]
        self.stats = Stats()
        self.progress = Progress(args.cases, quiet=args.quiet)
        self.restarts = 0
        self.startup_deaths = 0
        self.workers = [self._spawn(i) for i in range(args.workers)]

    def _spawn(self, wid: int) -> Worker:
        return Worker(self.ctx, wid, self.root, self.args.timeout, self.memory_bytes, _draw(self.args))

    def _record(self, record: dict[str, Any]) -> None:
        self.stats.add(record)
        self.progress.update(self.stats)

    def _replace(self, i: int, outcome: str | None, detail: str) -> None:
        """Kill worker ``i`` (recording ``outcome`` for its case, if it had one) and start another."""
        w = self.workers[i]
        w.proc.join(2)
        faults = w.faults_tail()
        if not w.ready:
            self.startup_deaths += 1
            if self.startup_deaths >= 3:
                raise RuntimeError(f"workers die at startup (exit {w.proc.exitcode}):\n{faults}")
        if w.seed is not None and outcome is not None:
            rmtree(self.root / f"case-{w.seed}")
            self._record(lost_record(w.seed, outcome, detail, faults))
        w.kill()
        self.workers[i] = self._spawn(w.wid)
        self.restarts += 1

    def _died(self, i: int) -> None:
        w = self.workers[i]
        w.proc.join(5)
        code = w.proc.exitcode
        name = signal.Signals(-code).name if code is not None and code < 0 else f"exit{code}"
        # SIGKILL that we did not send: the kernel's OOM killer
        outcome = "memory" if name == "SIGKILL" else f"crash:{name}@{native_site(w.faults_tail())}"
        self._replace(i, outcome, f"worker died ({name})")

    def loop(self) -> None:
        while self.stats.done < self.args.cases:
            for i, w in enumerate(self.workers):
                if w.ready and w.seed is None and self.pending:
                    seed = self.pending.pop()
                    try:
                        w.assign(seed)
                    except OSError:  # died while idle
                        self.pending.append(seed)
                        w.seed = None
                        self._died(i)
            ready = wait([w.conn for w in self.workers], timeout=0.5)
            for i, w in enumerate(list(self.workers)):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        self._died(i)
                        continue
                    if msg[0] == "ready":
                        w.ready = True
                        self.startup_deaths = 0
                    else:
                        w.seed = None
                        self._record(msg[1])
                elif w.seed is not None and time.monotonic() - w.started > self.args.timeout + WATCHDOG_GRACE_S:
                    elapsed = time.monotonic() - w.started
                    try:
                        os.kill(w.proc.pid, signal.SIGABRT)  # faulthandler dumps where it is stuck
                    except OSError:
                        pass
                    self._replace(i, "hang", f"killed by the watchdog after {elapsed:.0f} s")

    def close(self) -> None:
        for w in self.workers:
            try:
                if w.proc.is_alive():
                    w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            w.proc.join(5)
            w.kill()
        self.progress.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="laplace-fuzz-"))
    start = time.monotonic()
    runner: Runner | None = None
    try:
        runner = Runner(args, root)
        runner.loop()
    except KeyboardInterrupt:
        print("\ninterrupted: writing what is done", file=sys.stderr)
    finally:
        if runner is not None:
            runner.close()
        rmtree(root)
    assert runner is not None
    stats, restarts = runner.stats, runner.restarts
    elapsed = time.monotonic() - start
    from tests.fuzz import mutate

    vectors = mutate.vectors(versions=args.versions)
    return {
        "config": {
            "cases": args.cases,
            "workers": args.workers,
            "seed": args.seed,
            "timeout_s": args.timeout,
            "memory_mib": args.memory_mib,
            "versions": args.versions or "all",
            "large": args.large,
            "seed_of_case_i": f"{args.seed} * {SEED_STRIDE} + i",
            # seeds reproduce only against the same vectors and mutations:
            "vectors": len(vectors),
            "vectors_sha256": _digest(vectors),
            "mutations": len(mutate.REGISTRY),
        },
        "library": library_info(),
        "elapsed_s": round(elapsed, 1),
        "cases_per_s": round(stats.done / elapsed, 2) if elapsed else None,
        "worker_restarts": restarts,
        **stats.summary(),
    }


class Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.bar = None
        self.last = time.monotonic()
        self.start = self.last
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def update(self, stats: Stats) -> None:
        bad = sum(stats.kinds[k] for k in ("crash", "accepted_unsafe", "hang", "memory", "harness_error"))
        if self.bar is not None:
            self.bar.update(stats.done - self.bar.n)
            self.bar.set_postfix(bad=bad, refresh=False)
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        due = stats.done == self.total or stats.done % step == 0 or now - self.last >= 15
        if self.quiet or not due:
            return
        self.last = now
        kinds = ", ".join(f"{k} {v}" for k, v in stats.kinds.most_common())
        print(f"[{now - self.start:6.1f}s] {stats.done}/{self.total} cases: {kinds}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(summary: dict[str, Any]) -> None:
    lib = summary["library"]
    print(f"\nfuzzed {lib.get('path')} (commit {str(lib.get('commit'))[:10]}, dirty {lib.get('dirty')})")
    print(f"{summary['cases']} cases in {summary['elapsed_s']} s ({summary['cases_per_s']}/s), "
          f"{summary['worker_restarts']} worker restarts")  # fmt: skip
    print("\noutcome kinds:   " + ", ".join(f"{k} {v}" for k, v in summary["outcome_kinds"].items()))
    print("\noutcomes:")
    for outcome, count in summary["outcomes"].items():
        print(f"  {count:7d}  {outcome}")
    kinds = [
        *("rejected", "accepted_safe", "accepted_unsafe", "rejected_valid"),
        *("crash", "hang", "memory", "harness_error"),
    ]
    for title, table in (("family", summary["per_family"]), ("mutation", summary["per_mutation"])):
        print(f"\nper {title} (cases containing it, by primary outcome kind):")
        print(f"  {'':34s}" + "".join(f"{k[:10]:>11s}" for k in kinds))
        for name, row in table.items():
            print(f"  {name:34s}" + "".join(f"{row.get(k, 0):11d}" for k in kinds))
    for title, key in (("crash sites", "crash_sites"), ("unsafe reasons", "unsafe_reasons"), ("hangs", "hangs"),
                       ("memory", "memory"), ("harness errors", "harness_errors")):  # fmt: skip
        rows = summary[key]
        if not rows:
            continue
        print(f"\n{title} (cases with it / as primary outcome; reproducer: --repro SEED):")
        for r in rows:
            repro = r["repro"]
            print(f"  {r['count']:6d} /{r['primary']:6d}  {r['finding']}")
            print(f"      seed {repro['seed']}: {repro['vector']} {repro['mutations']}")
            print(f"      {repro['detail'][:200]}")


def repro(args: argparse.Namespace) -> int:
    """One case, in this process (under the workers' memory limit), everything printed."""
    from tests.fuzz import oracle

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="laplace-fuzz-repro-"))
    rmtree(work)
    limit_address_space()
    memory_bytes = int(args.memory_mib * 2**20)
    record = run_one(args.repro, work, args.timeout, memory_bytes, keep=bool(args.keep), draw=_draw(args))
    case, result = record["case"], record["result"]
    print(f"seed {args.repro}: {case.get('vector')} {case.get('mutations')} refreshed={case.get('refreshed')}")
    if args.keep:
        print(f"folder: {work / 'artifact'}")
    shown = oracle.Result(result["outcome"], result["stage"], result["details"], result["traceback"])
    print(shown.summary(max_details=100))
    print(f"findings: {result['findings']}  ({result['seconds']} s, peak RSS +{result['peak_rss_mib']} MiB)")
    return 1 if shown.bad else 0


def _draw(args: argparse.Namespace) -> dict[str, Any]:
    return {"versions": args.versions, "large": args.large}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it is a hang")
    parser.add_argument("--memory-mib", type=float, default=1024, help="peak RSS growth of a case that is 'memory'")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    parser.add_argument(
        "--versions",
        type=lambda text: [v for v in text.split(",") if v],
        help="only vectors of these spec versions, e.g. 1.0,1.1 (default: every folder of spec/conformance)",
    )
    parser.add_argument(
        "--large",
        type=float,
        default=0.0,
        help="the share of cases built at realistic sizes (tests/fuzz/large.py: sides 512-1024; pass the same "
        "value to --repro)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--repro", type=int, metavar="SEED", help="run the case of this seed in-process and print it")
    parser.add_argument("--keep", metavar="DIR", help="with --repro: build the case in DIR and keep it")
    args = parser.parse_args()
    if args.repro is not None:
        return repro(args)
    summary = run(args)
    print_summary(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
