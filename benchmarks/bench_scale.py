"""Producers at real model shapes: cost ratio, memory against a model, passes under a budget.

    python benchmarks/bench_scale.py [--shapes smollm2-135m,llama-3.2-1b] [--targets all-linear,attention]
        [--structures kron,diag,kron_eig] [--max-memory 1G] [--device cpu] [--dtype float32]
        [--batch-size 2] [--max-length 64] [--batches 2] [--repeats 3] [--json results.json]
    python benchmarks/bench_scale.py --extrapolate --max-memory 40G   # sizes at 1B–70B, no compute

Models are random-init from transformers configs of the real architectures (nothing is
downloaded). Every (shape, targets, structure) runs in its own process so that its peak RSS is its
own. In that process, in order: a plain forward+backward of the same batches (targets' weights
requiring grad) for the step's own peak; ``compute_artifact`` under the memory plan; then, repeated
and interleaved, the plain forward+backward and the plan's largest pass, one ratio per repeat;
then ``save`` and a full validation. Printed per case: the median ratio, passes, the sums' peak
against the budget (asserted), artifact bytes ÷ bf16 model bytes, peak RSS against the memory model
(``docs/publisher.md``), and the command's time split.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)),
    "smollm2-360m": ("llama", dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, vocab_size=49152)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, vocab_size=128256)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=False)),
    "llama-3.1-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                    tie_word_embeddings=False)),
}  # fmt: skip
TARGETS = {"all-linear": "all-linear", "attention": "q_proj,k_proj,v_proj,o_proj"}
STRUCTURES: dict[str, dict[str, Any]] = {
    "kron": dict(structure="kron"),
    "diag": dict(structure="diag"),
    "kron_eig": dict(structure="kron", eig_rank=32, eig_sketch=True, dtype="bfloat16"),
}
GIB = 2**30


def build(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random-init causal LM with the real shape's config (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, sizes = SHAPES[shape]
    config = AutoConfig.for_model(kind, **{"max_position_embeddings": 4096, "tie_word_embeddings": True, **sizes})
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def meta_model(shape: str) -> torch.nn.Module:
    """The same model on the meta device: shapes and parameter counts, no memory."""
    with torch.device("meta"):
        return build(shape, torch.bfloat16, "meta")


def random_batches(vocab: int, batch_size: int, length: int, count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch_size, length), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def predicted_peak(baseline_peak: int, plan_peak: int) -> int:
    """The memory model: the training step's own peak (reached before its weight gradients exist)
    plus one pass's sums. Finishing a pass's blocks frees its sums as it goes (measured: within a
    few percent), and with several passes each pass's blocks go to disk as it ends, as the CLI does."""
    return baseline_peak + plan_peak


def timed(fn: Any, sync: Any) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(case: dict[str, Any], queue: mp.Queue) -> None:  # type: ignore[type-arg]
    from laplace_hub.artifact import Artifact
    from laplace_hub.linear import linear_shape
    from laplace_hub.manifest import BaseModelInfo
    from laplace_hub.models import select_targets
    from laplace_hub.producers import ComputeOptions, compute_artifact
    from laplace_hub.producers.compute import _pass
    from laplace_hub.producers.plan import input_owners, plan_passes

    held: list[int] = []

    class Sums(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(int(record.args[1]))  # type: ignore[index]

    logging.getLogger("laplace_hub.producers.compute").addHandler(Sums())
    logging.getLogger("laplace_hub.producers.compute").setLevel(logging.INFO)
    device, dtype = case["device"], getattr(torch, case["dtype"])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    model = build(case["shape"], dtype, device)
    load_s = time.perf_counter() - start
    targets = select_targets(model, TARGETS[case["targets"]])
    batches = random_batches(model.config.vocab_size, case["batch_size"], case["max_length"], case["batches"])
    for p in model.parameters():
        p.requires_grad_(False)

    def plain() -> None:
        for m in targets.values():
            m.weight.requires_grad_(True)
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        for m in targets.values():
            m.weight.grad = None

    timed(plain, sync)  # warm-up, and the step's own peak
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    options = ComputeOptions(**STRUCTURES[case["structure"]])
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    plan = plan_passes(shapes, input_owners(model, targets, batches[0]), options, case["max_memory"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    info = BaseModelInfo(repo_id=case["shape"])
    spill = Path(tempfile.mkdtemp()) if len(plan.groups) > 1 else None  # as `laplace-hub compute` does
    artifact = compute_artifact(model, {"random": batches}, targets, options, info, plan=plan, spill=spill)
    sync()
    compute_s = time.perf_counter() - start
    compute_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    first = {n: targets[n] for n in plan.groups[0]}

    def one_pass() -> None:  # the plan's first (largest) pass alone, for the cost ratio
        _pass(model, {"random": batches}, first, options, {}, "timing")

    # Interleaved, one ratio per repeat: load from other processes hits both sides of a ratio alike.
    pairs = [(timed(plain, sync), timed(one_pass, sync)) for _ in range(case["repeats"])]
    plain_s = statistics.median(p for p, _ in pairs)
    pass_s = statistics.median(c for _, c in pairs)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        artifact.save(Path(tmp) / "a")
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        Artifact.open(Path(tmp) / "a", verify_checksums=True, check_values=True).tensors()
        validate_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    stored = artifact.nbytes()
    if spill is not None:
        shutil.rmtree(spill)
    queue.put(
        dict(
            case,
            modules=len(targets),
            params=params,
            passes=len(plan.groups),
            plan_peak=plan.peak,
            sums_peak=max(held[: len(plan.groups)]),
            artifact_bytes=stored,
            artifact_per_model=stored / (2 * params),
            plain_s=plain_s,
            pass_s=pass_s,
            ratio=statistics.median(c / p for p, c in pairs),
            baseline_rss=baseline_rss,
            peak_rss=compute_rss,
            predicted_rss=predicted_peak(baseline_rss, plan.peak),
            gpu_peak=gpu_peak,
            seconds=dict(load=load_s, curvature=compute_s, write=write_s, validate=validate_s),
        )
    )


def extrapolate(structures: list[str], targets: list[str], budget: int | None) -> None:
    """Sums per pass, passes, artifact and penalty bytes at the large shapes, from shapes alone."""
    from laplace_hub.errors import LaplaceHubError
    from laplace_hub.linear import linear_shape
    from laplace_hub.models import select_targets
    from laplace_hub.producers import ComputeOptions
    from laplace_hub.producers.plan import module_bytes, plan_passes

    print(f"{'shape':<14} {'targets':<11} {'structure':<9} {'model bf16':>11} {'sums, 1 pass':>13} "
          f"{'passes':>6} {'artifact':>13} {'/ model':>8}")  # fmt: skip
    for shape in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"):
        model = meta_model(shape)
        params = sum(p.numel() for p in model.parameters())
        for target in targets:
            chosen = select_targets(model, TARGETS[target])
            shapes = {n: linear_shape(m) for n, m in chosen.items()}
            owners = _owners_by_name(chosen)
            for structure in structures:
                options = ComputeOptions(**STRUCTURES[structure])
                whole = plan_passes(shapes, owners, options, None).peak
                try:
                    passes = str(len(plan_passes(shapes, owners, options, budget).groups))
                except LaplaceHubError:  # one module's sums alone exceed the budget
                    passes = "none"
                stored = sum(module_bytes(s, owners[n] == n, options) for n, s in shapes.items())
                if structure == "kron_eig":  # stored: k eigenvectors and values per factor, not the sketches
                    k = options.eig_rank or 0
                    sides = [s[0] + 1 + (s[1] + 1 if owners[n] == n else 0) for n, s in shapes.items()]
                    stored = torch.empty((), dtype=getattr(torch, options.dtype)).element_size() * k * sum(sides)
                print(f"{shape:<14} {target:<11} {structure:<9} {2 * params / GIB:>9.1f} G {whole / GIB:>11.1f} G "
                      f"{passes:>6} {stored / GIB:>11.2f} G {stored / (2 * params):>8.1%}")  # fmt: skip


def _owners_by_name(chosen: dict[str, Any]) -> dict[str, str]:
    """Llama's input sharing (q/k/v read one tensor, gate/up read one) without running the model."""
    owners = {}
    for name in chosen:
        prefix, leaf = name.rsplit(".", 1)
        owner = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(leaf, leaf)
        owners[name] = f"{prefix}.{owner}" if f"{prefix}.{owner}" in chosen else name
    return owners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m,smollm2-360m,qwen2.5-0.5b,llama-3.2-1b")
    parser.add_argument("--targets", default="all-linear,attention")
    parser.add_argument("--structures", default="kron,diag,kron_eig")
    parser.add_argument("--max-memory", default="1G", help="the sums' budget per pass (e.g. 1G, 512M)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-above", type=float, default=18.0, help="skip cases predicted above this many GiB RSS")
    parser.add_argument("--extrapolate", action="store_true", help="print the memory model at 1B–70B and stop")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from laplace_hub.cli._common import byte_size

    budget = byte_size(args.max_memory)
    structures, targets = args.structures.split(","), args.targets.split(",")
    if args.extrapolate:
        extrapolate(structures, targets, budget)
        return
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device_name}; model {dtype}; batches {args.batches} x {args.batch_size} x {args.max_length} tokens; "
          f"budget {budget / GIB:.2f} GiB of sums; medians of {args.repeats}")  # fmt: skip
    print(f"{'shape':<13} {'targets':<10} {'struct':<8} {'pass/fb':>7} {'passes':>6} {'sums GiB':>8} "
          f"{'art/model':>9} {'RSS GiB':>7} {'model':>6} {'err':>5} {'GPU GiB':>7}  "
          "load / curvature / write / validate s")  # fmt: skip
    results = []
    ctx = mp.get_context("spawn")
    for shape in args.shapes.split(","):
        for target in targets:
            for structure in structures:
                case = dict(shape=shape, targets=target, structure=structure, max_memory=budget, device=args.device,
                            dtype=dtype, batch_size=args.batch_size, max_length=args.max_length,
                            batches=args.batches, repeats=args.repeats)  # fmt: skip
                if not _fits(case, args.skip_above):
                    print(f"{shape:<13} {target:<10} {structure:<8} skipped: predicted over {args.skip_above} GiB")
                    continue
                queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
                proc = ctx.Process(target=measure, args=(case, queue))
                proc.start()
                r = queue.get()
                proc.join()
                assert r["sums_peak"] <= budget, f"sums {r['sums_peak']} over the budget {budget}"
                results.append(r)
                s = r["seconds"]
                err = r["predicted_rss"] / r["peak_rss"] - 1
                gpu = f"{r['gpu_peak'] / GIB:>7.2f}" if r["gpu_peak"] else f"{'-':>7}"
                print(f"{shape:<13} {target:<10} {structure:<8} {r['ratio']:>7.2f} {r['passes']:>6} "
                      f"{r['sums_peak'] / GIB:>8.3f} {r['artifact_per_model']:>9.2%} {r['peak_rss'] / GIB:>7.2f} "
                      f"{r['predicted_rss'] / GIB:>6.2f} {err:>+5.0%} {gpu}  "
                      f"{s['load']:.0f} / {s['curvature']:.0f} / {s['write']:.0f} / {s['validate']:.0f}",
                      flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=device_name, results=results), indent=2))


def _fits(case: dict[str, Any], limit_gib: float) -> bool:
    """Whether the memory model predicts the case under ``limit_gib`` (from shapes, before running)."""
    from laplace_hub.linear import linear_shape
    from laplace_hub.models import select_targets
    from laplace_hub.producers import ComputeOptions
    from laplace_hub.producers.plan import module_bytes

    model = meta_model(case["shape"])
    params = sum(p.numel() for p in model.parameters())
    chosen = select_targets(model, TARGETS[case["targets"]])
    owners = _owners_by_name(chosen)
    options = ComputeOptions(**STRUCTURES[case["structure"]])
    sums = sum(module_bytes(linear_shape(m), owners[n] == n, options) for n, m in chosen.items())
    model_bytes = params * torch.empty((), dtype=getattr(torch, case["dtype"])).element_size()
    return (3 * model_bytes + min(sums, case["max_memory"]) + sums) / GIB < limit_gib


if __name__ == "__main__":
    main()
