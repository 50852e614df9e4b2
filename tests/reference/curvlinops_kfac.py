"""The one place that imports curvlinops: its K-FAC factors, in our names and our scale.

curvlinops keeps its factors in private fields (``_input_covariances``,
``_gradient_covariances``) and counts every position as a loss term, so this adapter is only fed
unpadded, fully labelled batches. Pinned to curvlinops-for-pytorch 3.0.x (scripts/setup_env.sh);
``test_curvlinops_canary`` fails loudly when that API moves.
"""

from __future__ import annotations

from torch import Tensor, nn

PREFIX = "lm."


class NextTokenLogits(nn.Module):
    """A causal LM as curvlinops wants it: classes on dim 1.

    It is fed ``input_ids[:, :-1]``: the last position predicts no label, and curvlinops would
    count its input in ``Σx`` (we count only positions that carry a loss).
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits.permute(0, 2, 1)


def curvlinops_factors(
    lm: nn.Module, input_ids: list[Tensor], names: list[str], fisher_type: str, kfac_approx: str, mc_samples: int = 1
) -> dict[str, tuple[Tensor, Tensor]]:
    """``name → (Σx, Σg)`` in laplace-hub's per-sequence normalisation (SPEC.md §6)."""
    from curvlinops import KFACLinearOperator

    wrapper = NextTokenLogits(lm)
    modules = dict(lm.named_modules())
    params = [modules[n].weight for n in names]
    data = [(ids[:, :-1], ids[:, 1:]) for ids in input_ids]
    n_sequences = sum(ids.shape[0] for ids in input_ids)
    kfac = KFACLinearOperator(
        wrapper,
        nn.CrossEntropyLoss(reduction="sum"),
        params,
        data,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
        kfac_approx=kfac_approx,
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    # reduction="sum": Σg is summed over sequences; ours is a mean per sequence.
    return {
        n: (kfac._input_covariances[PREFIX + n], kfac._gradient_covariances[PREFIX + n] / n_sequences) for n in names
    }


__all__ = ["curvlinops_factors"]
