"""dtrain's CPU SyncBatchNorm equals BatchNorm on the concatenated batch (2 real gloo ranks)."""

import copy

import torch
import torch.nn as nn
from helpers import spawn

from dtrain.engines.norm import DistributedBatchNorm, convert_sync_batchnorm


def _compare(rank: int, world: int, sync: bool, mean: float = 1.0, std: float = 3.0) -> None:
    torch.manual_seed(0)
    full = torch.randn(2 * 6, 3, 5, 5) * std + mean  # the global batch; each rank takes half
    ref = nn.BatchNorm2d(3, momentum=0.2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    bn = (
        convert_sync_batchnorm(nn.Sequential(copy.deepcopy(ref)), torch.device("cpu"))[0]
        if sync
        else nn.BatchNorm2d(3, momentum=0.2)
    )  # (the conversion keeps the Parameters: convert a copy)
    if not sync:
        bn.load_state_dict(ref.state_dict())
    assert isinstance(bn, DistributedBatchNorm) == sync

    x_ref = full.clone().requires_grad_()
    w = torch.randn(full.shape, generator=torch.Generator().manual_seed(1))  # a loss that is not symmetric
    (ref(x_ref) * w).sum().backward()

    x = full[rank * 6 : (rank + 1) * 6].clone().requires_grad_()
    y = bn(x)
    (y * w[rank * 6 : (rank + 1) * 6]).sum().backward()

    # Parameter gradients are summed over ranks by DDP; here we sum them by hand.
    gw = bn.weight.grad.clone()
    torch.distributed.all_reduce(gw)
    out_err = (y - _train_forward(ref, full)[rank * 6 : (rank + 1) * 6]).abs().max().item()
    grad_err = (x.grad - x_ref.grad[rank * 6 : (rank + 1) * 6]).abs().max().item()
    wgrad_err = (gw - ref.weight.grad).abs().max().item()
    mean_err = (bn.running_mean - ref.running_mean).abs().max().item()
    var_err = (bn.running_var - ref.running_var).abs().max().item()
    errs = dict(out=out_err, input_grad=grad_err, weight_grad=wgrad_err, running_mean=mean_err, running_var=var_err)
    if sync:
        # Near 1e4 an fp32 mean is only good to ~1e-4 (BatchNorm's own as much as ours): the
        # bound scales with it. The E[x^2] - E[x]^2 formula is off by more than the variance there.
        assert max(errs.values()) < 1e-5 * max(1.0, abs(mean) / 1e2), errs
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


def test_variance_is_stable_when_the_mean_dwarfs_the_spread():
    """Inputs of mean 1e4 and std 1: the global statistics still match BatchNorm."""
    spawn(_compare, 2, True, 1e4, 1.0)


def test_naive_variance_would_fail_there():
    """What the two-pass variance guards against: E[x^2] - E[x]^2 in fp32 at mean 1e4, std 1."""
    x = torch.randn(12 * 25, generator=torch.Generator().manual_seed(0)) + 1e4
    naive = (x * x).mean() - x.mean() ** 2
    assert abs(naive.item() - x.double().var(unbiased=False).item()) > 0.5  # off by more than half the variance
    centered = x - x.mean()
    assert abs((centered * centered).mean().item() - x.double().var(unbiased=False).item()) < 1e-3


def _eval_mode(rank: int, world: int) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.BatchNorm1d(4 * 36))
    m(torch.randn(8, 1, 8, 8))  # give the running stats values
    c = convert_sync_batchnorm(copy.deepcopy(m), torch.device("cpu"))  # converts in place: keep m plain
    assert isinstance(c[1], DistributedBatchNorm) and isinstance(c[4], DistributedBatchNorm)
    assert not isinstance(m[1], DistributedBatchNorm)
    assert set(c.state_dict()) == set(m.state_dict())  # model.pt loads into the plain model
    m.eval(), c.eval()
    # Each rank a different input: synchronised batch statistics here would change the output.
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(rank)) * (1 + 3 * rank)
    assert torch.allclose(m(x), c(x), atol=1e-6)
    c.train()
    assert not torch.allclose(m(x), c(x), atol=1e-3)  # in training mode the statistics are the ranks'


def test_convert_keeps_state_and_eval_uses_running_stats():
    spawn(_eval_mode, 2)
