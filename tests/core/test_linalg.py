"""th_edit.core.linalg against dense linear algebra on random matrices."""

import pytest
import torch

from th_edit.core import linalg


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_factored_svd_matches_dense(batch):
    A, B = _rand(*batch, 40, 8, seed=1), _rand(*batch, 32, 8, seed=2)
    U, S, V = linalg.factored_svd(A, B, dtype=torch.float64)
    M = A @ B.transpose(-1, -2)
    S_ref = torch.linalg.svdvals(M)[..., :8]
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.transpose(-1, -2), M, rtol=1e-10, atol=1e-10)
    eye = torch.eye(8, dtype=torch.float64).expand(*batch, 8, 8)
    torch.testing.assert_close(U.transpose(-1, -2) @ U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(V.transpose(-1, -2) @ V, eye, atol=1e-10, rtol=0)


def test_factored_svd_fp32_from_half_inputs():
    A, B = _rand(64, 16, seed=3).to(torch.bfloat16), _rand(64, 16, seed=4).to(torch.bfloat16)
    U, S, V = linalg.factored_svd(A, B)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    M = A.double() @ B.double().T
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(M)[:16], rtol=1e-4, atol=1e-5)


def test_sign_convention_is_deterministic_and_invariant_to_input_sign_flips():
    A, B = _rand(20, 5, seed=5), _rand(20, 5, seed=6)
    U1, S1, V1 = linalg.factored_svd(A, B, dtype=torch.float64)
    U2, S2, V2 = linalg.factored_svd(-A, -B, dtype=torch.float64)  # same product
    torch.testing.assert_close(U1, U2, atol=1e-10, rtol=0)
    torch.testing.assert_close(V1, V2, atol=1e-10, rtol=0)
    idx = U1.abs().argmax(dim=0)
    assert (U1[idx, torch.arange(5)] > 0).all()


def test_degenerate_blocks():
    assert linalg.degenerate_blocks(torch.tensor([5.0, 4.0, 3.0])) == []
    assert linalg.degenerate_blocks(torch.tensor([5.0, 5.0, 3.0, 1.0, 1.0 + 1e-6])) == [[0, 1], [3, 4]]
    assert linalg.degenerate_blocks(torch.tensor([5.0, 4.9, 1.0]), rtol=0.05) == [[0, 1]]
    assert linalg.degenerate_blocks(torch.tensor([2.0, 1.0, 0.0, 0.0])) == [[2, 3]]
    with pytest.raises(ValueError):
        linalg.degenerate_blocks(torch.ones(2, 2))


def test_fold_norm_matches_dense_matrices():
    W, g = _rand(10, 3, seed=7), _rand(10, seed=8)
    C = torch.eye(10, dtype=torch.float64) - torch.ones(10, 10, dtype=torch.float64) / 10
    torch.testing.assert_close(linalg.fold_norm(W, "layernorm", g), C @ torch.diag(g) @ W)
    torch.testing.assert_close(linalg.fold_norm(W, "rmsnorm", g), torch.diag(g) @ W)
    torch.testing.assert_close(linalg.fold_norm(W, None, g), W)


@pytest.mark.parametrize("centered", [False, True])
def test_ov_edit_factors_add_exact_rank_one_change(centered):
    W_V, W_O = _rand(24, 6, seed=9), _rand(6, 24, seed=10)
    if centered:  # LayerNorm folding makes the read factor's column space miss the ones vector
        W_V = W_V - W_V.mean(0, keepdim=True)
    U, S, V = linalg.factored_svd(W_V, W_O.T, dtype=torch.float64)
    for comps, alpha in (([0], 0.0), ([2], 3.0), ([1, 4], 0.5)):
        idx = torch.tensor(comps)
        coeff = (alpha - 1) * S[idx]
        left, right = linalg.ov_edit_factors(W_V, U[:, idx], coeff, V[:, idx])
        new = W_V @ (W_O + left.double() @ right.double().T)
        expected = W_V @ W_O + U[:, idx] @ torch.diag(coeff) @ V[:, idx].T
        torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_gain", [False, True])
def test_qk_edit_factors_add_exact_rank_one_change(with_gain):
    d, dh = 24, 6
    W_Q, W_K, g = _rand(d, dh, seed=11), _rand(d, dh, seed=12), _rand(d, seed=13)
    gq = _rand(dh, seed=14).abs() + 0.5 if with_gain else None
    gk = _rand(dh, seed=15).abs() + 0.5 if with_gain else None
    N = (torch.eye(d, dtype=torch.float64) - 1.0 / d) @ torch.diag(g)

    def read(W, gain):
        R = N @ W
        return R * gain if gain is not None else R

    Q_read, K_read = read(W_Q, gq), read(W_K, gk)
    U, S, V = linalg.factored_svd(Q_read, K_read, dtype=torch.float64)
    idx = torch.tensor([1])
    coeff = (0.25 - 1) * S[idx]
    left, right = linalg.qk_edit_factors(W_Q, Q_read, K_read, U[:, idx], coeff, V[:, idx], q_gain=gq)
    new = read(W_Q + left.double() @ right.double().T, gq) @ K_read.T
    expected = Q_read @ K_read.T + coeff * U[:, idx] @ V[:, idx].T
    torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-5)
