"""The Van Loan-Pitsianis rearrangement that turns Kronecker structure into rank structure."""

from __future__ import annotations

import torch

from cdka_search.errors import TargetError


def check_shape(M: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> None:
    """Raise TargetError unless M is a 2-D tensor of shape (m1*m2, n1*n2) with positive factors."""
    if min(m1, n1, m2, n2) < 1:
        raise TargetError(f"factor sizes must be positive, got m1={m1}, n1={n1}, m2={m2}, n2={n2}")
    if M.dim() != 2 or tuple(M.shape) != (m1 * m2, n1 * n2):
        raise TargetError(
            f"matrix of shape {tuple(M.shape)} does not split as (m1*m2, n1*n2) = "
            f"({m1 * m2}, {n1 * n2}) for m1={m1}, n1={n1}, m2={m2}, n2={n2}"
        )


def rearrange(M: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """R(M) of shape (m1*n1, m2*n2), so that R(kron(B, A)) = outer(vec(B), vec(A)).

    B is m1 x n1 and A is m2 x n2; M must be (m1*m2) x (n1*n2). Only permutes entries.
    """
    check_shape(M, m1, n1, m2, n2)
    return M.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
