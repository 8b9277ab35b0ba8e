"""A short training run on a small real multi-task problem reaches a stated accuracy.

Data: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download). Task 1: the digit
(10 classes); task 2: its parity (2 classes). A shared MLP trunk with BatchNorm, one linear head per
task, Adam, mini-batches of 64, 4 epochs on 1400 images; evaluated on the 397 held-out images in
eval mode. Stated accuracy: >= 93 % (digit) and >= 94 % (parity) for every optimizer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlsam_fast

datasets = pytest.importorskip(
    "sklearn.datasets", reason="scikit-learn provides the bundled digits data"
)

DIGIT_ACC, PARITY_ACC = 0.93, 0.94


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    return X, y, perm[:1400], perm[1400:]


CASES = {
    "fmtl-mgda": (mtlsam_fast.FMTL, "mgda", dict(rho=0.05)),
    "fmtl-asam-ls": (mtlsam_fast.FMTL, "ls", dict(rho=0.5, adaptive=True)),
    "samo-ls": (mtlsam_fast.SAMO, "ls", dict(rho=0.05, alpha=0.5)),
    "aggregation-mgda": (mtlsam_fast.MTLOptimizer, "mgda", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_digits_two_tasks_reach_stated_accuracy(case, digits):
    cls, wname, kw = CASES[case]
    X, y, train, test = digits
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()
    )
    heads = nn.ModuleList([nn.Linear(32, 10), nn.Linear(32, 2)])
    opt = cls(
        trunk.parameters(), [h.parameters() for h in heads], torch.optim.Adam, wname, lr=3e-3, **kw
    )
    g = torch.Generator().manual_seed(1)
    first = None
    for _ in range(4):
        order = train[torch.randperm(len(train), generator=g)]
        for b in range(0, len(order), 64):
            xb, yb = X[order[b : b + 64]], y[order[b : b + 64]]

            def closure():
                f = trunk(xb)
                return [
                    nn.functional.cross_entropy(heads[0](f), yb),
                    nn.functional.cross_entropy(heads[1](f), yb % 2),
                ]

            losses = opt.step(closure)
            first = losses if first is None else first
    assert (losses < first).all()
    trunk.eval()
    with torch.no_grad():
        f = trunk(X[test])
        digit = (heads[0](f).argmax(1) == y[test]).float().mean().item()
        parity = (heads[1](f).argmax(1) == y[test] % 2).float().mean().item()
    assert digit >= DIGIT_ACC and parity >= PARITY_ACC, (digit, parity)
