"""LazyAdam and the sparse-aware gradient clip: torch's Adam where gradients are dense, Adam on the touched rows
only where they are sparse, and the same clip as torch's on the gradients' values."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from recbole_speeder.trainer.lazy_adam import LazyAdam, clip_grad_norm_, sparse_grad_parameters


def sparse_rows(rows: list[int], values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """An uncoalesced sparse gradient, as an embedding's backward writes it (a row may repeat)."""
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape)


@pytest.mark.parametrize("decoupled, reference", [(False, torch.optim.Adam), (True, torch.optim.AdamW)])
def test_dense_gradients_get_torchs_adam_bit_for_bit(decoupled, reference):
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(4)]
    ours = [nn.Parameter(t.clone()) for t in start]
    theirs = [nn.Parameter(t.clone()) for t in start]
    lazy = LazyAdam(ours, lr=0.01, weight_decay=0.1, decoupled_weight_decay=decoupled)
    plain = reference(theirs, lr=0.01, weight_decay=0.1)
    for _ in range(4):
        grads = [torch.randn_like(t) for t in start]
        for params, optimizer in ((ours, lazy), (theirs, plain)):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@pytest.mark.parametrize("decoupled", [False, True])
def test_a_sparse_gradient_over_every_row_is_adam_and_over_some_rows_leaves_the_others_alone(decoupled):
    torch.manual_seed(1)
    start = torch.randn(6, 4)
    lazy_table, dense_table = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    lazy = LazyAdam([lazy_table], lr=0.05, weight_decay=0.01, decoupled_weight_decay=decoupled)
    dense = LazyAdam([dense_table], lr=0.05, weight_decay=0.01, decoupled_weight_decay=decoupled)
    for _ in range(3):  # every row touched, some twice: the same numbers as dense Adam
        values = torch.randn(8, 4)
        rows = [0, 1, 2, 3, 4, 5, 1, 4]
        lazy_table.grad = sparse_rows(rows, values, (6, 4))
        dense_table.grad = lazy_table.grad.to_dense()
        lazy.step()
        dense.step()
    assert torch.allclose(lazy_table, dense_table, atol=1e-6)

    weights = lazy_table.detach().clone()
    moments = {key: lazy.state[lazy_table][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    lazy_table.grad = sparse_rows([2, 5], torch.randn(2, 4), (6, 4))
    lazy.step()
    untouched = [0, 1, 3, 4]
    assert torch.equal(lazy_table[untouched], weights[untouched])
    assert all(torch.equal(lazy.state[lazy_table][key][untouched], moments[key][untouched]) for key in moments)
    assert not torch.equal(lazy_table[[2, 5]], weights[[2, 5]])
    assert lazy.state[lazy_table]["step"].item() == 4


def test_the_state_dict_resumes_a_lazy_table_exactly():
    torch.manual_seed(2)
    table = nn.Parameter(torch.randn(5, 2))
    optimizer = LazyAdam([table], lr=0.1)
    table.grad = sparse_rows([1, 3], torch.randn(2, 2), (5, 2))
    optimizer.step()
    twin = nn.Parameter(table.detach().clone())
    resumed = LazyAdam([twin], lr=0.1)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as read back from a file
    grad = sparse_rows([3, 4], torch.randn(2, 2), (5, 2))
    for param, opt in ((table, optimizer), (twin, resumed)):
        param.grad = grad.clone()
        opt.step()
    assert torch.equal(table, twin)


def test_clipping_sparse_and_dense_gradients_matches_torch_on_their_dense_form():
    torch.manual_seed(3)
    table, bias = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(3))
    table.grad = sparse_rows([0, 4, 0], torch.randn(3, 3) * 5, (6, 3))
    bias.grad = torch.randn(3) * 5
    dense_table, dense_bias = nn.Parameter(table.detach().clone()), nn.Parameter(bias.detach().clone())
    dense_table.grad, dense_bias.grad = table.grad.to_dense(), bias.grad.clone()
    total = clip_grad_norm_([table, bias], max_norm=1.0)
    expected = nn.utils.clip_grad_norm_([dense_table, dense_bias], max_norm=1.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6) and total.item() > 1
    assert table.grad.is_sparse and torch.allclose(table.grad.to_dense(), dense_table.grad, atol=1e-6)
    assert torch.allclose(bias.grad, dense_bias.grad, atol=1e-6)


def test_only_sparse_embeddings_are_listed():
    module = nn.ModuleDict({"ids": nn.Embedding(4, 2, sparse=True), "words": nn.Embedding(4, 2),
                            "proj": nn.Linear(2, 2)})
    assert sparse_grad_parameters(module) == [module["ids"].weight]
