"""The three ops at ResNet50-400x400 shapes, every available backend beside the reference.

Each case times its implementations in turn, round by round (``conftest.compare``). Cases whose id
contains ``quick`` form the short run (``-k quick``, used by ``tlg bench``).
"""
from __future__ import annotations

import pytest
import torch

import tlg
from tlg.ops import reference as R

from conftest import RESNET50_LAYERS, RESNET50_STACK_IDS, backends_for, compare, encoder_workload

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _features(batch: int):
    g = torch.Generator().manual_seed(0)
    q = [torch.randn(batch, c, h, h, generator=g) for c, h in RESNET50_LAYERS]
    s = [torch.randn(batch, c, h, h, generator=g) for c, h in RESNET50_LAYERS]
    return q, s


def _quarter_mask(batch: int, size: int = 50) -> torch.Tensor:
    """A support mask covering 25% of the support area (a centred square of half the side)."""
    m = torch.zeros(batch, size, size)
    lo, hi = size // 4, size // 4 + size // 2
    m[:, lo:hi, lo:hi] = 1
    return m


def _corr_flops(batch: int) -> int:
    return sum(2 * batch * c * h**4 for c, h in RESNET50_LAYERS)


@pytest.mark.parametrize("masked", [False, True], ids=["full", "mask25"])
@pytest.mark.parametrize("batch", [1, 4], ids=["b1-quick", "b4"])
def test_correlation_13_layers(benchmark, masked, batch):
    q, s = _features(batch)
    mask = _quarter_mask(batch) if masked else None
    fns = {backend: (lambda backend=backend: tlg.ops.multilayer_correlation(q, s, RESNET50_STACK_IDS, mask,
                                                                            backend=backend))
           for backend in backends_for("correlation")}
    outs = compare(benchmark, "correlation", f"13 layers b{batch} {'mask25' if masked else 'full'}", fns,
                   _corr_flops(batch))
    for out in outs.values():
        assert [o.shape[1] for o in out] == [3, 6, 4]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", [1, 4], ids=["b1-quick", "b4"])
def test_hsnet_encoder(benchmark, mode, batch):
    fns, flops = {}, 0
    for backend in backends_for("cp_conv4d"):
        fns[backend], flops = encoder_workload(backend, mode, batch)
    outs = compare(benchmark, "4d-encoder", f"HSNet encoder {mode} b{batch}", fns, flops)
    for out in outs.values():
        assert out.shape == (batch, 128, 50, 50)


SINKHORN_CASES = {"16x50x50-quick": (16, 50, 50), "4x625x625": (4, 625, 625)}


def _sinkhorn_problem(shape):
    g = torch.Generator().manual_seed(0)
    return torch.rand(*shape, generator=g)


def _sinkhorn_impls():
    impls = list(backends_for("sinkhorn"))
    try:
        import ot.batch  # noqa: F401
        impls.append("pot-batch")
    except ImportError:
        pass
    return impls


@pytest.mark.parametrize("case", list(SINKHORN_CASES))
def test_sinkhorn(benchmark, case):
    """eps 0.5 (TLG's value), tol 1e-6, at most 1000 iterations. POT's batch solver stops on the
    change of its duals rather than on the marginal error; both errors are printed."""
    cost = _sinkhorn_problem(SINKHORN_CASES[case])
    eps, tol, max_iter = 0.5, 1e-6, 1000
    fns = {}
    for impl in _sinkhorn_impls():
        if impl == "pot-batch":
            import ot.batch

            fns[impl] = lambda: ot.batch.solve_batch(cost, reg=eps, max_iter=max_iter, tol=tol,  # noqa: E731
                                                     method="log_sinkhorn", grad="detach").plan
        else:
            fns[impl] = (lambda impl=impl: tlg.ops.sinkhorn(cost, eps=eps, max_iter=max_iter, tol=tol,
                                                            backend=impl).plan)
    a = torch.full(cost.shape[:2], 1.0 / cost.shape[1])
    b = torch.full((cost.shape[0], cost.shape[2]), 1.0 / cost.shape[2])

    def marginal_error(plan: torch.Tensor) -> float:
        return max(R.sinkhorn_marginal_error(plan, a).max().item(),
                   R.sinkhorn_marginal_error(plan.transpose(1, 2), b).max().item())

    plans = compare(benchmark, "sinkhorn", f"{case.replace('-quick', '')} eps0.5", fns, None,
                    note=lambda impl, plan: f"marginal err {marginal_error(plan):.1e}")
    for plan in plans.values():
        assert marginal_error(plan) < 1e-3
