"""The FSDP2 engine (`engine=fsdp`) on 2 gloo CPU ranks against the DDP engine; sharded (DCP)
checkpoints resumed on another world size; `compile` and activation checkpointing.

The DDP baselines are the session's shared runs (`tiny_runs`), also used by test_deepspeed.
"""

import json

import pytest
import torch
from helpers import CNN, DDP_BASELINE, LM, TINY_CNN, check, load_params, max_param_diff, run_dtrain

from dtrain.config import ConfigError
from dtrain.engines import blocks
from dtrain.tasks.transformer import CharTransformer
from dtrain.train.config import load_config

FSDP = "engine=fsdp"
# The straight FSDP2 run every comparison shares; its EMA (which does not change training) is
# compared with the one resumed across world sizes.
STRAIGHT = (FSDP, "ema.decay=0.9")


def summary(out):
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_fsdp_matches_ddp_and_a_bf16_reduction_does_not(tiny_runs):
    """Transformer, fp32, clipping at 0.5 (it clips: the LM's norms are ~2), 20 steps. The EMA's
    evaluation equals DDP's too: FSDP2 keeps the root's gathered parameters after a forward, so
    the shadow swapped into the shards is only seen once the modules are resharded (it was not:
    eval_ema 3.89 vs 4.10)."""
    ddp_run = tiny_runs("ddp", *DDP_BASELINE)
    ddp = load_params(ddp_run / "model.pt")
    fsdp = tiny_runs("fsdp", *STRAIGHT)
    assert max_param_diff(ddp, load_params(fsdp / "model.pt")) <= 1e-5
    s = summary(fsdp)
    assert s["engine"] == "fsdp" and s["final_loss"] < s["initial_loss"]
    ema, ema_ddp = s["eval_ema"]["loss"], summary(ddp_run)["eval_ema"]["loss"]
    assert abs(ema - ema_ddp) <= 1e-4 and abs(ema - s["eval"]["loss"]) > 1e-3, (ema, ema_ddp, s["eval"])
    # The bound sees a real change to the reduction: gradients reduce-scattered in bf16.
    bf16 = tiny_runs("fsdp-reduce-bf16", FSDP, "fsdp.reduce_dtype=bf16")
    assert max_param_diff(ddp, load_params(bf16 / "model.pt")) > 1e-5


@pytest.mark.slow
def test_cnn_with_sync_batchnorm_matches_ddp(tiny_runs):
    """With `fsdp.offload` on: the shards live in CPU memory between uses (on a CPU job the same
    memory; the key's logic runs all the same, and changes no number)."""
    ddp = tiny_runs("cnn-ddp", *DDP_BASELINE, recipe=CNN, base=TINY_CNN)
    fsdp = tiny_runs("cnn-fsdp", FSDP, "fsdp.offload=true", "ema.decay=0.9", recipe=CNN, base=TINY_CNN)
    assert max_param_diff(load_params(ddp / "model.pt"), load_params(fsdp / "model.pt"), buffers=True) <= 1e-5
    assert summary(fsdp)["eval"]["accuracy"] == summary(ddp)["eval"]["accuracy"]
    # EMA of DTensor shards beside plain BatchNorm buffers (the first update used to crash).
    assert abs(summary(fsdp)["eval_ema"]["loss"] - summary(ddp)["eval_ema"]["loss"]) <= 1e-4


@pytest.mark.slow
def test_sharded_checkpoint_resumes_on_another_world_size_with_accumulation(tiny_runs):
    """2 ranks to step 8 -> 1 rank to step 14 -> 2 ranks to 20, with asynchronous checkpoints
    every 4 steps and 2 micro-steps per step (the reduce-scatter only on the last; no dropout,
    no BatchNorm): the end equals the straight 2-rank run of 1 micro-step (DCP reshards on load)."""
    straight = tiny_runs("fsdp", *STRAIGHT)
    common = [*STRAIGHT, "checkpoint.every_steps=4", "checkpoint.async=true", "data.grad_accum_steps=2"]
    tiny_runs("fsdp-resharded", *common, "train.stop_at_step=8")
    run = tiny_runs("fsdp-resharded", *common, "train.stop_at_step=14", "resume=auto", nproc=1)
    shards = sorted(p.name for p in (run / "checkpoints" / "step_00000014" / "model").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "extra.pt"]  # written by one rank
    assert (run / "checkpoints" / "step_00000014" / "ema" / ".metadata").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000014"
    tiny_runs("fsdp-resharded", *common, "resume=auto")
    assert max_param_diff(load_params(straight / "model.pt"), load_params(run / "model.pt")) <= 1e-5
    assert summary(run)["steps"] == 20 and summary(run)["grad_accum_steps"] == 2
    # The weight average came through both reshardings: the same evaluation as straight through.
    ema, ema_straight = summary(run)["eval_ema"], summary(straight)["eval_ema"]
    assert ema["loss"] == pytest.approx(ema_straight["loss"], abs=1e-5) and ema["loss"] != summary(run)["eval"]["loss"]
    # model.pt is a plain full state_dict: it loads into the plain model.
    cfg = load_config(run / "config.yaml")
    vocab = json.loads((run / "vocab.json").read_text())
    CharTransformer(cfg.model, len(vocab)).load_state_dict(load_params(run / "model.pt"))


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.slow
def test_compiled_matches_eager(tiny_runs, engine):
    eager = load_params(tiny_runs(engine, *(STRAIGHT if engine == "fsdp" else DDP_BASELINE)) / "model.pt")
    # (FSDP2 also keeps gathered parameters after forward here: a memory/speed switch, not a numeric one.)
    extra = ["fsdp.reshard_after_forward=false"] if engine == "fsdp" else []
    compiled = tiny_runs(f"{engine}-compiled", f"engine={engine}", "compile=true", *extra)
    diff = max_param_diff(eager, load_params(compiled / "model.pt"))
    print(f"compiled vs eager, {engine}: max |param difference| {diff:.2g}")
    assert diff <= 1e-4
    s = summary(compiled)
    assert s["compile_s"] > 0 and s["throughput"] > 0


def _lm(mode: str) -> CharTransformer:
    cfg = load_config(
        LM, ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.block_size=64", "model.dropout=0.1"]
    )
    torch.manual_seed(0)
    model = CharTransformer(cfg.model, 65)
    blocks.prepare(model, list(model.blocks), mode, compile=False)
    return model


def _peak_memory(mode: str) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, gradients, peak bytes of live tensors in forward + backward), the peak measured
    by torch's MemTracker (it tracks every tensor's storage, CPU included)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = _lm(mode)
    x = torch.randint(0, 65, (8, 64), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the dropout masks: recomputation replays the same ones
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return loss.detach().item(), {n: p.grad for n, p in model.named_parameters()}, peak


def test_activation_checkpointing_same_gradients_less_memory():
    """Full and selective AC against none, with dropout on: the same loss and gradients, and
    a lower peak of live tensors."""
    loss, grads, none = _peak_memory("none")
    print(f"peak memory: none {none / 2**20:.2f} MiB", end="")
    for mode in ("selective", "full"):
        l2, g2, peak = _peak_memory(mode)
        print(f", {mode} {peak / 2**20:.2f} MiB ({peak / none:.2f}x)", end="")
        assert abs(l2 - loss) <= 1e-6
        assert max((grads[n] - g2[n]).abs().max().item() for n in grads) <= 1e-6
        assert peak < 0.9 * none
    print()


def test_refusals_are_one_line(tmp_path):
    """The engines' refusals (`dtrain.engines.validate`, run before torchrun starts)."""
    from dtrain.train.config import validate

    with pytest.raises(ConfigError, match=r"^engine='fsdp': not for a GAN"):
        validate(load_config(CNN.replace("cnn_digits", "gan_ring"), [FSDP]))
    with pytest.raises(ConfigError, match=r"^compile=True: not with gan.penalty=r1"):
        load_config(CNN.replace("cnn_digits", "gan_ring"), ["compile=true"])
    with pytest.raises(ConfigError, match=r"^checkpoint.async=True: not with engine=deepspeed"):
        validate(load_config(LM, ["engine=deepspeed", "checkpoint.async=true"]))
    proc = run_dtrain(
        [
            "train",
            LM,
            FSDP,
            "precision=fp16",
            "train.max_steps=1",
            "tracking.enabled=false",
            f"output_dir={tmp_path}/o",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "dtrain: error: precision='fp16': not supported with engine=fsdp (FSDP2 keeps fp32 master weights and "
        "computes in bf16 without loss scaling): use precision=bf16"
    )


def test_tf32_is_used_where_the_gpu_has_it_and_the_recipe_allows():
    from dtrain.engines.precision import set_fp32_matmuls, tf32_mode

    assert tf32_mode(True, (8, 0)) == "tf32" and tf32_mode(True, (9, 0)) == "tf32"
    assert tf32_mode(True, (7, 5)) == "ieee"  # Turing and older have no TF32
    assert tf32_mode(False, (9, 0)) == "ieee"
    assert set_fp32_matmuls(True, torch.device("cpu")) is None  # nothing to set, nothing printed
    assert load_config(LM).allow_tf32 and not load_config(LM, ["allow_tf32=false"]).allow_tf32


@pytest.mark.slow
def test_dtrain_average_reads_sharded_checkpoints(tiny_runs, tmp_path):
    """The last checkpoint of the resharded run (written by 2 ranks as DCP shards), read back in
    one process by `dtrain average`, is exactly the model.pt the run wrote."""
    run = tiny_runs("fsdp-resharded")  # trained by the resume test above
    check(
        run_dtrain(
            ["average", str(run / "checkpoints" / "step_00000020"), "--output", str(tmp_path / "m.pt")], cwd=tmp_path
        )
    )
    assert max_param_diff(load_params(run / "model.pt"), load_params(tmp_path / "m.pt")) == 0
