"""Autograd through the ops: an op given a tensor that requires grad either gives the reference's
gradients (checked with ``torch.autograd.gradcheck`` in fp64) whichever backend was asked for, or
refuses it (the QP solvers). The compiled kernels are not differentiable: such a call runs on the
torch reference, and the dispatch log says so."""

from __future__ import annotations

import pytest
import torch

from mtlsam_fast import ops

BACKENDS = ["auto", *ops.available_backends("cpu")]
F64 = torch.float64


def _leaf(*shape, dtype=F64, positive=False):
    t = torch.rand(*shape, dtype=dtype) + 0.5 if positive else torch.randn(*shape, dtype=dtype)
    return t.requires_grad_()


OFFSETS = torch.tensor([0, 3, 3, 8])  # an empty segment
S = 3


def _functions(backend):
    """op name -> (function of leaf tensors, those leaves) for gradcheck."""
    perturb_noise = {"noise_scale": _leaf(S, positive=True), "seed": 7, "noise_offset": 11}

    def perturb(backup, direction, scale, noise_scale, adaptive):
        theta = torch.empty(8, dtype=F64)
        return ops.perturb(
            theta,
            backup,
            OFFSETS,
            direction,
            scale,
            adaptive=adaptive,
            noise_scale=noise_scale,
            seed=7,
            noise_offset=11,
            backend=backend,
        )

    def diff_gram(A, B):
        return ops.diff_gram(A.clone(), B, backend=backend)

    def combine_subtract(w, G, out):
        return ops.combine(w, G, out=out.clone(), subtract=True, backend=backend)

    def perturb_noise_stats(backup, noise_scale, ref):
        theta = torch.empty(8, dtype=F64)
        stats = ops.perturb_noise_stats(
            theta, backup, OFFSETS, noise_scale, ref, seed=3, noise_offset=5, backend=backend
        )
        return theta, stats

    return {
        "gram": (lambda G: ops.gram(G, backend=backend), (_leaf(3, 8),)),
        "diff_gram": (diff_gram, (_leaf(3, 8), _leaf(3, 8))),
        "segment_norms": (
            lambda x, w: ops.segment_norms(x, OFFSETS, weight=w, backend=backend),
            (_leaf(2, 8), _leaf(8)),
        ),
        "combine": (
            lambda w, G, w2, H: ops.combine(w, G, w2, H, backend=backend),
            (_leaf(3), _leaf(3, 8), _leaf(2), _leaf(2, 8)),
        ),
        "combine subtract": (combine_subtract, (_leaf(3), _leaf(3, 8), _leaf(8))),
        "perturb": (
            lambda b, d, s, ns: perturb(b, d, s, ns, False),
            (_leaf(8), _leaf(8), _leaf(S), perturb_noise["noise_scale"]),
        ),
        "perturb adaptive": (
            lambda b, d, s: perturb(b, d, s, None, True),
            (_leaf(8), _leaf(8), _leaf(S)),
        ),
        "noise_stats": (lambda r: ops.noise_stats(1, 2, r, OFFSETS, backend=backend), (_leaf(8),)),
        "perturb_noise_stats": (perturb_noise_stats, (_leaf(8), _leaf(S), _leaf(8))),
    }


OPS = list(_functions("torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_in_fp64(backend, op):
    fn, leaves = _functions(backend)[op]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("torch",)])
@pytest.mark.parametrize("op", OPS)
def test_kernel_dtypes_take_the_reference_and_say_so(backend, op):
    """fp32 inputs that require grad, which the compiled kernels would take (and lose the graph
    of): the op runs on the reference, with its gradients, and the dispatch log records why."""
    fn, leaves = _functions(backend)[op]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]

    def as32(f):
        def run(*ts):  # the functions build fp64 temporaries: cast them where they are made
            with _default_dtype(torch.float32):
                return f(*ts)

        return run

    with ops.dispatch_log() as log:
        out = as32(fn)(*leaves32)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.requires_grad for o in outs)
    assert log and all(d.backend == "torch" for d in log), log
    if backend != "auto" or ops.available_backends("cpu") != ["torch"]:
        assert any(d.fallback and "autograd" in d.fallback for d in log), log
    grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves32)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves32]
    ref_fn = _functions("torch")[op][0]
    ref_outs = as32(ref_fn)(*ref_leaves)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    ref_grads = torch.autograd.grad(sum(o.sum() for o in ref_outs), ref_leaves)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, r)


class _default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_qp_solvers_refuse_autograd(backend):
    gram = (torch.eye(3) + 0.1).requires_grad_()
    with pytest.raises(TypeError, match=r"solve_qp does not support autograd \(gram requires"):
        ops.solve_qp(gram, backend=backend)
    G = torch.randn(3, 8, requires_grad=True)
    out = torch.zeros(8)
    with pytest.raises(TypeError, match="min_norm_aggregate does not support autograd"):
        ops.min_norm_aggregate(G, out, backend=backend)
    assert torch.equal(out, torch.zeros(8))
    with torch.no_grad():  # what the optimizers do: no graph, no refusal
        assert ops.solve_qp(gram, backend=backend).shape == (3,)
        ops.min_norm_aggregate(G, out, backend=backend)
    assert ops.solve_qp(gram.detach(), backend=backend).shape == (3,)


def test_no_grad_keeps_the_kernels():
    """Under ``torch.no_grad()`` (the optimizers' steps) a tensor that requires grad is just data:
    the compiled backend runs."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("no C++ backend")
    G = torch.randn(3, 8, requires_grad=True)
    with torch.no_grad(), ops.dispatch_log() as log:
        out = ops.gram(G, backend="cpu")
    assert not out.requires_grad and [d.backend for d in log] == ["cpu"]
