"""CUDA: the same operators on the GPU agree with the CPU (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hessinv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 3)).to(dtype)
    X, y = torch.randn(7, 6, dtype=dtype), torch.randint(0, 3, (7,))
    H_cpu = hessinv.hessian(net, nn.CrossEntropyLoss(), X, y)
    net_gpu = net.cuda()
    H_gpu = hessinv.hessian(net_gpu, nn.CrossEntropyLoss(), X.cuda(), y.cuda())
    assert H_gpu.gradient.is_cuda
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(H_gpu.gradient.cpu(), H_cpu.gradient, atol=tol)
    v = torch.randn(H_cpu.shape[0], dtype=dtype)
    assert torch.allclose((H_gpu @ v.cuda()).cpu(), H_cpu @ v, atol=tol)
    eps = 0.5
    x_gpu, info = H_gpu.solve(H_gpu.gradient, damping=eps, return_info=True)
    x_cpu = H_cpu.solve(H_cpu.gradient, damping=eps)
    assert x_gpu.is_cuda and info.residual < 1e-10
    assert torch.allclose(x_gpu.cpu(), x_cpu, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=tol)
    assert H_gpu.factor(-1.0).inertia == H_cpu.factor(-1.0).inertia


def test_device_mismatch_is_named():
    net = nn.Sequential(nn.Linear(2, 2)).double()
    X = torch.randn(3, 2, dtype=torch.float64, device="meta")
    with pytest.raises(hessinv.DtypeMismatchError, match="meta"):
        hessinv.hessian(net, nn.MSELoss(), X, torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("where", ["inputs", "targets", "both"])
def test_a_meta_batch_is_named_by_the_optimizers(where):
    # (the all-ignored-targets test read the meta targets first: a raw "Tensor.item() cannot be called on
    # meta tensors" from Newton.step, torch.nonzero's NotImplementedError from Preconditioner.update)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    X = X.to("meta") if where != "targets" else X
    y = y.to("meta") if where != "inputs" else y
    loss_fn = nn.CrossEntropyLoss(ignore_index=0)
    with pytest.raises(hessinv.DtypeMismatchError, match="are on meta"):
        hessinv.optim.Newton(net, loss_fn).step(X, y)
    with pytest.raises(hessinv.DtypeMismatchError, match="are on meta"):
        hessinv.optim.Preconditioner(net, loss_fn).update(X, y)
