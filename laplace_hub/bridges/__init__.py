"""Bridges: curvature computed by other libraries, written as laplace-hub artifacts.

:mod:`laplace_hub.bridges.curvlinops` turns curvlinops' ``KFACLinearOperator`` into a weight-space
``kron`` artifact, :mod:`laplace_hub.bridges.kronfluence` a Kronfluence factor folder;
:mod:`laplace_hub.bridges.laplace_torch` turns a fitted laplace-torch
``KronLaplace`` / ``DiagLaplace`` into an artifact and an artifact's diagonal into its prior
precision (docs/bridges.md). Each bridge imports its library lazily, inside the functions
that need it, so importing this package costs nothing.
"""

__all__: list[str] = []
