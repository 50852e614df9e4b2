"""curvlinops operators → artifacts: equal to the native producer, and to the operator's own matrix, in float64."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from laplace_hub import Artifact
from laplace_hub.bridges.curvlinops import compute_kfac, to_artifact
from laplace_hub.cli import main
from laplace_hub.consumers import LaplaceRegularizer, adapted_modules
from laplace_hub.data import pad_batch
from laplace_hub.errors import LaplaceHubError, MissingExtraError
from laplace_hub.manifest import BaseModelInfo
from laplace_hub.producers import ComputeOptions, compute_artifact
from tests.conftest import tiny_llama, tiny_model_folder

curvlinops = pytest.importorskip("curvlinops")
from curvlinops import EKFACLinearOperator, KFACLinearOperator  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
NAMES = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in TARGETS] + ["model.layers.1.mlp.down_proj"]


class NextTokenLogits(nn.Module):
    """A causal LM as curvlinops wants it: classes on dim 1 (fed ``ids[:, :-1]``, labels ``ids[:, 1:]``)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits.permute(0, 2, 1)


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


def sequences(lengths: list[list[int]], seed: int = 2) -> list[torch.Tensor]:
    """Batches of unpadded token ids, one tensor per batch (each batch of one length)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 23, (n, length), generator=gen) for n, length in lengths]


EQUAL = [[3, 6], [2, 6]]  # two batches, every sequence of 6 tokens


def operator(model, batches, names=NAMES, cls=KFACLinearOperator, reduction="sum", **kwargs):
    modules = dict(model.named_modules())
    data = [(ids[:, :-1], ids[:, 1:]) for ids in batches]
    loss = nn.CrossEntropyLoss(reduction=reduction)
    params = [modules[n].weight for n in names]
    kwargs.setdefault("fisher_type", "empirical")
    return cls(NextTokenLogits(model), loss, params, data, check_deterministic=False, **kwargs)


def native(model, datasets, names=NAMES, **options):
    opts = ComputeOptions(accumulate_dtype=torch.float64, dtype="float64", **options)
    targets = {n: m for n, m in model.named_modules() if n in names}
    padded = {name: [pad_batch(ids.tolist(), 0) for ids in batches] for name, batches in datasets.items()}
    return compute_artifact(model, padded, targets, opts, BaseModelInfo(repo_id="t"))


def assert_same_blocks(got: Artifact, want: Artifact, dataset: str | None = None, **tolerance) -> None:
    assert sorted(got.manifest.modules) == sorted(want.manifest.modules)
    for name in want.manifest.modules:
        a = got.block(name, dataset, dtype=torch.float64).dense()
        b = want.block(name, dataset, dtype=torch.float64).dense()
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize(
    ("normalization", "approx", "reduction"),
    [
        ("per_sequence", "expand", "sum"),
        ("per_token", "expand", "sum"),
        ("per_sequence", "reduce", "sum"),
        ("per_sequence", "expand", "mean"),
        ("per_token", "expand", "mean"),
        ("per_sequence", "reduce", "mean"),
    ],
)
def test_operator_to_artifact_equals_native(base, tmp_path: Path, normalization: str, approx: str, reduction: str):
    batches = sequences(EQUAL)
    op = operator(base, batches, kfac_approx=approx, reduction=reduction)
    art = to_artifact(op, base, base_model="t", normalization=normalization, dtype="float64")
    art.save(tmp_path / "a")
    opened = Artifact.open(tmp_path / "a", verify_checksums=True, check_values=True)
    want = native(base, {"source": batches}, normalization=normalization, kfac_approx=approx)
    assert_same_blocks(opened, want)
    m = opened.manifest
    assert (m.estimator.kind, m.estimator.mc_samples, m.kfac_approx, m.normalization) == (
        "empirical",
        None,
        approx,
        normalization,
    )
    assert [d.model_dump() for d in m.datasets] == [d.model_dump() for d in want.manifest.datasets]
    assert m.base_model.fingerprint == want.manifest.base_model.fingerprint
    assert "curvlinops-for-pytorch" in m.software and "laplace-hub.bridges.curvlinops" in m.software
    # q_proj and v_proj read the same input: one Σx, stored once
    q, v = (m.modules[f"model.layers.0.self_attn.{p}"].blocks[0] for p in TARGETS)
    assert q.input.key == v.input.key  # type: ignore[union-attr]


def test_eigen_truncated_and_packed_equal_native(base) -> None:
    batches = sequences(EQUAL)
    art = to_artifact(operator(base, batches), base, base_model="t", dtype="float64", eig_rank=3, packed=True)
    assert {b.structure for e in art.manifest.modules.values() for b in e.blocks} == {"kron_eig"}
    assert_same_blocks(art, native(base, {"source": batches}, eig_rank=3))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_operators_per_length_pool_to_native_on_padded_batches(base, approx: str) -> None:
    """Sequences of several lengths: one operator per length, pooled, equal the native producer on padded batches."""
    by_length = sequences([[2, 4], [3, 7], [1, 3]], seed=5)
    ops = [operator(base, [ids], kfac_approx=approx) for ids in by_length]
    art = to_artifact(ops, base, base_model="t", dtype="float64")
    rows = [row.tolist() for ids in by_length for row in ids]  # lengths 4, 4, 7, 7, 7, 3: padded batches of 3
    opts = ComputeOptions(accumulate_dtype=torch.float64, dtype="float64", kfac_approx=approx)
    targets = {n: m for n, m in base.named_modules() if n in NAMES}
    batches = [pad_batch(rows[i : i + 3], 0) for i in (0, 3)]
    want = compute_artifact(base, {"source": batches}, targets, opts, BaseModelInfo(repo_id="t"))
    assert_same_blocks(art, want)
    assert (art.manifest.datasets[0].sequences, art.manifest.datasets[0].tokens) == (6, 2 * 3 + 3 * 6 + 2)


@pytest.mark.parametrize("per_dataset", [False, True])
def test_named_datasets_summed_or_separate(base, per_dataset: bool) -> None:
    a, b = sequences([[2, 5]], seed=3), sequences([[3, 5]], seed=4)
    art = to_artifact(
        {"a": operator(base, a), "b": operator(base, b)}, base, base_model="t", dtype="float64", per_dataset=per_dataset
    )
    want = native(base, {"a": a, "b": b}, per_dataset=per_dataset)
    assert art.manifest.datasets_combined == want.manifest.datasets_combined
    for dataset in ("a", "b") if per_dataset else (None,):
        assert_same_blocks(art, want, dataset)


def peft_model(model, rank=2, alpha=3.0):
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for m in adapted_modules(peft):
            m.lora_b.normal_(generator=torch.Generator().manual_seed(7))
    return peft.double()


SCALES = {"1/N": lambda n, t: 1 / n, "1/T": lambda n, t: 1 / t, "T/N": lambda n, t: t / n, "1": lambda n, t: 1.0}


@pytest.mark.parametrize(
    ("fisher", "reduction", "normalization", "scale"),
    [
        ("empirical", "sum", "per_sequence", "1/N"),
        ("empirical", "sum", "per_token", "1/T"),
        ("empirical", "mean", "per_sequence", "T/N"),
        ("empirical", "mean", "per_token", "1"),
        ("mc", "sum", "per_sequence", "1/N"),
    ],
)
def test_regularizer_equals_the_operators_own_quadratic_form(base, fisher, reduction, normalization, scale) -> None:
    """op → artifact → LaplaceRegularizer = λ/2 Σ vec(Δ)ᵀ (c · op's diagonal block) vec(Δ), c from docs/bridges.md."""
    names = NAMES[:4]  # exactly the modules PEFT adapts
    mc = {"mc_samples": 3, "seed": 5} if fisher == "mc" else {}
    op = operator(base, sequences(EQUAL), names=names, reduction=reduction, fisher_type=fisher, **mc)
    art = to_artifact(op, base, base_model="t", normalization=normalization, dtype="float64")
    if fisher == "mc":
        assert (art.manifest.estimator.kind, art.manifest.estimator.mc_samples, art.manifest.estimator.seed) == (
            "mc",
            3,
            5,
        )
    n, t = 5, 25
    matrix = op @ torch.eye(op.shape[1], dtype=torch.float64)
    sizes = [int(p.numel()) for p in op._params]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    blocks = {name: matrix[o : o + s, o : o + s] for name, o, s in zip(names, offsets, sizes, strict=True)}
    model = peft_model(base)
    penalty = LaplaceRegularizer.from_artifact(art, model, strength=0.7, dtype=torch.float64)()
    expected = 0.0
    for m in adapted_modules(model):
        delta = (m.scaling * m.lora_b @ m.lora_a).reshape(-1)
        expected = expected + SCALES[scale](n, t) * delta @ blocks[m.name] @ delta
    torch.testing.assert_close(penalty, 0.5 * 0.7 * expected.detach(), rtol=1e-6, atol=1e-12)


# the CLI: compute --backend curvlinops against the native backend, on padded batches of several lengths


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("tiny-model"), [3, 9, 5, 12, 4, 7, 9, 2, 6])


def cli_artifact(folder: Path, out: Path, *flags: str) -> Artifact:
    argv = ["compute", str(folder), "--data", f"src={folder / 'source.txt'}", "--out", str(out), "--quiet"]
    argv += ["--targets", "q_proj,v_proj", "--max-length", "10", "--batch-size", "3", "--num-batches", "3", *flags]
    assert main(argv) == 0
    return Artifact.open(out, check_values=True)


@pytest.mark.parametrize(
    "flags",
    [
        ["--float64", "--dtype", "float64"],
        ["--normalization", "per_token", "--rank", "3"],
        ["--kfac-approx", "reduce", "--per-dataset"],
    ],
    ids=["float64", "per_token-rank", "reduce-per_dataset"],
)
def test_cli_backend_curvlinops_equals_native(model_folder: Path, tmp_path: Path, flags: list[str]) -> None:
    want = cli_artifact(model_folder, tmp_path / "native", *flags)
    got = cli_artifact(model_folder, tmp_path / "curvlinops", *flags, "--backend", "curvlinops")
    float64 = "--float64" in flags
    tolerance = {"rtol": 1e-5, "atol": 1e-9} if float64 else {"rtol": 1e-5, "atol": 1e-7}
    dataset = "src" if "--per-dataset" in flags else None
    assert_same_blocks(got, want, dataset, **tolerance)
    strip = ("software", "files")
    a, b = (json.loads(x.manifest.model_dump_json(exclude=set(strip))) for x in (got, want))
    a.pop("modules"), b.pop("modules")
    assert a == b  # counts, estimator (and its seed), fingerprint, normalisation: the same record


def test_cli_backend_curvlinops_mc(model_folder: Path, tmp_path: Path) -> None:
    art = cli_artifact(
        model_folder, tmp_path / "a", "--backend", "curvlinops", "--estimator", "mc", "--mc-samples", "2"
    )
    assert (art.manifest.estimator.kind, art.manifest.estimator.mc_samples) == ("mc", 2)


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--structure", "diag"], "--structure"),
        (["--structure", "kron_tridiag", "--parameterization", "lora"], "--structure"),
        (["--parameterization", "lora"], "--parameterization"),
        (["--rank", "4", "--sketch"], "--sketch"),
        (["--max-memory", "1G"], "--max-memory"),
        (["--model-dtype", "bfloat16"], "--model-dtype"),
        (["--device-map", "auto"], "--device-map"),
        (["--fsdp"], "--fsdp"),
    ],
)
def test_cli_refuses_what_curvlinops_cannot_do(
    flags: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d.txt").write_text("t2 t3 t4")
    argv = ["compute", str(tmp_path / "no-model"), "--data", f"x={tmp_path / 'd.txt'}", "--out", str(tmp_path / "a")]
    assert main([*argv, "--backend", "curvlinops", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag}: "), err


# refusals of the bridge


def test_ekfac_is_refused(base) -> None:
    op = operator(base, sequences(EQUAL), cls=EKFACLinearOperator)
    with pytest.raises(LaplaceHubError, match="EKFAC is not exported"):
        to_artifact(op, base, base_model="t")


def mlp_operator(model: nn.Module, params, loss=None, data=None, **kwargs):
    data = data or [(torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))]
    loss = loss or nn.CrossEntropyLoss(reduction="sum")
    kwargs.setdefault("fisher_type", "empirical")
    return KFACLinearOperator(model, loss, params, data, check_deterministic=False, **kwargs)


@pytest.fixture
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: mlp_operator(m, [m[0].weight, m[0].bias]), "covers the bias"),
        (lambda m: mlp_operator(m, [m[2].weight], nn.CrossEntropyLoss(label_smoothing=0.1)), "cross-entropy"),
        (lambda m: mlp_operator(m, [m[2].weight], fisher_type="type-2"), "type-2"),
        (lambda m: mlp_operator(m, [m[2].weight], fisher_type="forward-only"), "forward-only"),
        (
            lambda m: mlp_operator(
                m, [m[2].weight], data=[(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, -100, 1]))]
            ),
            "ignore_index",
        ),
        (lambda m: "not an operator", "expected curvlinops' KFACLinearOperator"),
    ],
)
def test_what_the_spec_cannot_hold_is_refused(mlp: nn.Sequential, make, message: str) -> None:
    with pytest.raises(LaplaceHubError, match=message):
        to_artifact(make(mlp), mlp, base_model="t")


def test_mse_and_foreign_modules_are_refused(mlp: nn.Sequential) -> None:
    data = [(torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))]
    with pytest.raises(LaplaceHubError, match="cross-entropy"):
        to_artifact(mlp_operator(mlp, [mlp[2].weight], nn.MSELoss(), data), mlp, base_model="t")
    other = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    with pytest.raises(LaplaceHubError, match="not one of `model`'s"):
        to_artifact(mlp_operator(mlp, [mlp[2].weight]), other, base_model="t")


class AllButLast(NextTokenLogits):
    """Fed whole sequences, predicts from all but the last position: the layers see one more than y labels."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids)[..., :-1]


def test_positions_without_a_label_are_refused(base) -> None:
    ids = sequences(EQUAL)[0]
    params = [dict(base.named_modules())[NAMES[0]].weight]
    op = KFACLinearOperator(
        AllButLast(base), nn.CrossEntropyLoss(), params, [(ids, ids[:, 1:])], fisher_type="empirical"
    )
    with pytest.raises(LaplaceHubError, match="leading"):
        to_artifact(op, base, base_model="t")


def test_inconsistent_operators_and_options_are_refused(base) -> None:
    mixed = [(ids[:, :-1], ids[:, 1:]) for ids in sequences([[2, 4], [2, 6]])]
    op = KFACLinearOperator(
        NextTokenLogits(base),
        nn.CrossEntropyLoss(reduction="sum"),
        [dict(base.named_modules())[NAMES[0]].weight],
        mixed,
        fisher_type="empirical",
        check_deterministic=False,
    )
    with pytest.raises(LaplaceHubError, match="one operator per length"):
        to_artifact(op, base, base_model="t")
    batches = sequences(EQUAL)
    with pytest.raises(LaplaceHubError, match="must share kfac_approx"):
        to_artifact([operator(base, batches), operator(base, batches, kfac_approx="reduce")], base, base_model="t")
    with pytest.raises(LaplaceHubError, match="same modules"):
        to_artifact([operator(base, batches), operator(base, batches, names=NAMES[:2])], base, base_model="t")
    reduce = operator(base, batches, kfac_approx="reduce")
    with pytest.raises(LaplaceHubError, match="per_token needs expand") as info:
        to_artifact(reduce, base, base_model="t", normalization="per_token")
    assert info.value.location == "normalization"
    assert to_artifact(operator(base, batches), base, base_model="t", dtype="bfloat16").manifest.dtype == "bfloat16"


def test_compute_kfac_refuses_options_and_data(base) -> None:
    targets = {n: m for n, m in base.named_modules() if n in NAMES}
    batch = pad_batch([[3, 4, 5, 6]], 0)
    for options, location in [
        (ComputeOptions(structure="diag"), "structure"),
        (ComputeOptions(estimator="batch_empirical", structure="diag"), "structure"),
        (ComputeOptions(eig_rank=2, eig_sketch=True), "eig_sketch"),
    ]:
        with pytest.raises(LaplaceHubError) as info:
            compute_kfac(base, {"s": [batch]}, targets, options, BaseModelInfo(repo_id="t"))
        assert info.value.location == location
    masked = pad_batch([[3, 4, 5, 6]], 0, prompt_lengths=[2])
    with pytest.raises(LaplaceHubError, match="prompt masking"):
        compute_kfac(base, {"s": [masked]}, targets, ComputeOptions(), BaseModelInfo(repo_id="t"))


def test_missing_curvlinops_names_the_extra(base, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "curvlinops", None)
    with pytest.raises(MissingExtraError, match=r"laplace-hub\[curvlinops\]"):
        to_artifact(object(), base, base_model="t")


def test_curvlinops_fields_the_bridge_reads() -> None:
    """The canary of the bridge: the private fields it reads (curvlinops 3.0.x) are still there."""
    layer = nn.Linear(3, 2, bias=False)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    op = KFACLinearOperator(
        layer, nn.CrossEntropyLoss(reduction="sum"), [layer.weight], data, check_deterministic=False
    )
    op.compute_kronecker_factors()
    assert op._mapping == {"": {"weight": 0}} and op._model_func is layer and op._data is data
    assert (op._N_data, op._num_per_example_loss_terms, op._mc_samples, op._seed) == (4, 1, 1, 2147483647)
    assert op._fisher_type == "mc" and op._kfac_approx == "expand" and op._loss_func.reduction == "sum"
    assert op._input_covariances[""].shape == (3, 3) and op._gradient_covariances[""].shape == (2, 2)
    assert op._batch_size_fn(data[0][0]) == 4
