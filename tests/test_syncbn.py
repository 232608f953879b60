"""dtrain's CPU SyncBatchNorm equals BatchNorm on the concatenated batch (2 real gloo ranks)."""

import torch
import torch.nn as nn

from dtrain.norm import DistributedBatchNorm, convert_sync_batchnorm
from helpers import spawn


def _compare(rank: int, world: int, sync: bool) -> None:
    torch.manual_seed(0)
    full = torch.randn(2 * 6, 3, 5, 5) * 3 + 1  # the global batch; each rank takes half
    ref = nn.BatchNorm2d(3, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = convert_sync_batchnorm(nn.Sequential(ref), torch.device("cpu"))[0] if sync else nn.BatchNorm2d(3, momentum=0.2)
    if not sync:
        bn.load_state_dict(ref.state_dict())
    assert isinstance(bn, DistributedBatchNorm) == sync

    x_ref = full.clone().requires_grad_()
    w = torch.randn(full.shape, generator=torch.Generator().manual_seed(1))  # a loss that is not symmetric
    (ref(x_ref) * w).sum().backward()

    x = full[rank * 6:(rank + 1) * 6].clone().requires_grad_()
    y = bn(x)
    (y * w[rank * 6:(rank + 1) * 6]).sum().backward()

    # Parameter gradients are summed over ranks by DDP; here we sum them by hand.
    gw = bn.weight.grad.clone()
    torch.distributed.all_reduce(gw)
    out_err = (y - _train_forward(ref, full)[rank * 6:(rank + 1) * 6]).abs().max().item()
    grad_err = (x.grad - x_ref.grad[rank * 6:(rank + 1) * 6]).abs().max().item()
    wgrad_err = (gw - ref.weight.grad).abs().max().item()
    mean_err = (bn.running_mean - ref.running_mean).abs().max().item()
    var_err = (bn.running_var - ref.running_var).abs().max().item()
    errs = dict(out=out_err, input_grad=grad_err, weight_grad=wgrad_err, running_mean=mean_err, running_var=var_err)
    if sync:
        assert max(errs.values()) < 1e-5, errs
        assert bn.num_batches_tracked.item() == 1
    else:  # a per-rank BatchNorm sees only half the batch: the test can tell
        assert out_err > 1e-3 and var_err > 1e-3, errs


def _train_forward(ref: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    # Batch-statistics forward without touching ref's running stats again.
    return nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, training=True, eps=ref.eps)


def test_fallback_matches_batchnorm_on_concatenated_batch():
    spawn(_compare, 2, True)


def test_unsynchronised_batchnorm_differs():
    spawn(_compare, 2, False)


def test_convert_keeps_state_and_eval_uses_running_stats():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 36))
    m(torch.randn(8, 1, 8, 8))  # give the running stats values
    c = convert_sync_batchnorm(m, torch.device("cpu"))
    assert isinstance(c[1], DistributedBatchNorm) and isinstance(c[4], DistributedBatchNorm)
    assert set(c.state_dict()) == set(m.state_dict())  # model.pt loads into the plain model
    m.eval(), c.eval()
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(m(x), c(x))
