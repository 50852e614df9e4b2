"""Bridges: curvature computed by other libraries, written as laplace-hub artifacts.

:mod:`laplace_hub.bridges.curvlinops` turns curvlinops' ``KFACLinearOperator`` into a weight-space
``kron`` artifact (docs/bridges.md). Each bridge imports its library lazily, inside the functions
that need it, so importing this package costs nothing.
"""

__all__: list[str] = []
