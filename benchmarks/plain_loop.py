"""The hand-written PyTorch baseline for benchmarks/overhead.py: the CNN digits recipe as a
plain DDP loop (same model, data, sampler, optimizer, schedule, clipping), no dtrain.

    python benchmarks/plain_loop.py --steps 300 --batch 64
    torchrun --nnodes 1 --rdzv-backend dtrain --rdzv-endpoint 127.0.0.1:0 --local-addr 127.0.0.1 \
        --nproc_per_node 2 benchmarks/plain_loop.py --steps 300 --batch 64   (loopback only)
"""

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from dtrain.data.images import digits
from dtrain.tasks.cnn import ResNet

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=300)
p.add_argument("--batch", type=int, default=64, help="global batch")
p.add_argument("--warm", type=int, default=5, help="steps excluded from the timing")
args = p.parse_args()

world = int(os.environ.get("WORLD_SIZE", 1))
rank = int(os.environ.get("RANK", 0))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)

train, _ = digits(0.2)
sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
loader = DataLoader(train, batch_size=args.batch // world, sampler=sampler, drop_last=True)
model = ResNet(1, 10, [32, 64], 2)
if world > 1:
    model = DDP(model)
decay = [p for p in model.parameters() if p.ndim >= 2]
no_decay = [p for p in model.parameters() if p.ndim < 2]
lr = 0.2 * args.batch / 256
opt = torch.optim.SGD(
    [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
    lr=lr,
    momentum=0.9,
    nesterov=True,
)
warmup = 50
sched = torch.optim.lr_scheduler.LambdaLR(
    opt,
    lambda s: (
        (s + 1) / warmup
        if s < warmup
        else 0.5 * (1 + math.cos(math.pi * min((s - warmup) / max(1, args.steps - warmup), 1)))
    ),
)

step, epoch, t0, samples = 0, 0, None, 0
while step < args.steps:
    sampler.set_epoch(epoch)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        step += 1
        if step % 20 == 0:
            loss.item()  # what a plain loop prints
        if step == args.warm:
            t0, samples = time.perf_counter(), 0
        elif step > args.warm:
            samples += args.batch
        if step >= args.steps:
            break
    epoch += 1
elapsed = time.perf_counter() - t0
if rank == 0:
    print(json.dumps({"throughput": samples / elapsed}))
if world > 1:
    dist.barrier()  # gloo aborts a rank whose peer tears down first
    dist.destroy_process_group()
