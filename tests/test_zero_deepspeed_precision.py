"""Mixed precision on DeepSpeed ZeRO 1 and 2 (``parallel.zero_deepspeed``) against the replicated engine.

One launch at world 2 (ep=2: dense parameters partitioned over dp=2, experts split over the ranks)
drives the engine verbs as the training loop does (forward under ``precision.autocast``; fp16:
``loss_scale`` set, ``unscale_grads(1 / scale)``, then ``clip_grad_norm`` and ``step`` or, when the
norm is not finite, ``skip_step``) for the byte-level LM of the layout tests (global batch 8 in
micro-batches of 2, clipped at 0.05 every step, so the global norm matters) under zero 1 and 2, and
the same steps on ``ReplicatedEngine`` (stage 0) with the same precision:

- bf16 tracks the replicated bf16 run, and the parameters stay fp32. Step 1 starts from the same
  weights: both engines compute the same bf16 autocast forward and backward and reduce the gradients in
  fp32, so the loss is the same and the norm and the updated parameters differ only by the order of
  fp32 sums. Measured: loss 0, norm <= 8e-8, parameters <= 1e-7 (relative L2 of the worst one); the
  tolerances (1e-7, 1e-6, 1e-6) sit ~10x above that and far below what separates a bf16 step from an
  fp32 one (loss >= 1.3e-6, norm 6e-4, parameters 4e-2: asserted too, so the comparison tells bf16 from
  fp32) or from the opt-in bf16 gradient reduction (norm >= 5e-5, parameters 1e-3). Later steps start
  from weights that differ by an fp32 ulp here and there, and a weight next to a bf16 rounding boundary
  then casts to the neighbouring bf16 value: the runs drift apart by bf16 round-off, which Adam amplifies
  in parameters with a near-zero gradient (measured after three steps: loss 5e-6, norm 3e-5, parameters
  2e-4, with the router in fp32 and the experts in bf16), so every step is held to 2^-8 (bf16's
  relative round-off). The opt-in ``reduce_dtype=bf16`` is checked on its own: it really reduces the
  matmul weights' gradients in bf16 (never the router's) and stays within bf16 round-off of the
  replicated run (2^-8 for the loss and norm, 2^-8 per step for the parameters).
- fp16 with loss scaling, scales 2^8, 2^120, 2^8: the second step overflows (fp16 gradients of 2^120
  x the loss), the norm is infinite, ``skip_step`` leaves the parameters, the fp32 master partitions
  and AdamW's state bit for bit unchanged and DeepSpeed counts the skipped step; the finite steps track
  the replicated fp16 run (which unscales its own fp32 gradients) within the bf16 tolerances above
  (measured at step 1: loss 0, norm 2e-8, parameters 8e-8).
- checkpoints: after two bf16 steps the model's weights are DeepSpeed's fp32 masters, bit for bit; the
  model state and ``checkpoint_optimizer()`` loaded into a fresh engine (other initial weights) and
  pushed back by ``after_checkpoint_load`` make its third step equal the uninterrupted one, bit for bit.

Cost: one world-2 launch, ~17 s of CPU in all (50-60 s wall on the shared 2-core machine under load);
nothing JIT-compiled.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.layout import TINY_LM, relative_error

NUM_MICRO, MICRO, LR, STEPS = 2, 2, 3e-3, 3
CLIP = TINY_LM["optim"]["grad_clip"]  # 0.05: every step is clipped
FP16_SCALES = (2.0 ** 8, 2.0 ** 120, 2.0 ** 8)
LOSS_RTOL, NORM_RTOL, PARAM_RTOL = 1e-7, 1e-6, 1e-6  # step 1, from the same weights (the module doc)
BF16_EPS = 2.0 ** -8
ROUND_OFF = (BF16_EPS, BF16_EPS, BF16_EPS)  # every step: within bf16 round-off


def _task(cfg, groups, seed: int):
    from moe.trainer.setup import make_task

    torch.manual_seed(seed)
    return make_task(cfg, groups, torch.device("cpu"))


def _replicated(cfg, groups, precision):
    from moe.trainer.optim import build_optimizer
    from parallel import ReplicatedEngine

    task = _task(cfg, groups, 0)
    return task, ReplicatedEngine(task.model, groups, lambda m: build_optimizer(m, cfg.optim), precision=precision)


def _deepspeed(cfg, groups, precision, stage, *, seed=0, **kw):
    from moe.trainer.optim import build_optimizer
    from parallel.zero_deepspeed import DeepSpeedEngine

    task = _task(cfg, groups, seed)
    return task, DeepSpeedEngine(task.model, groups, lambda m: build_optimizer(m, cfg.optim),
                                 grad_clip=cfg.optim.grad_clip, stage=stage, num_micro=NUM_MICRO,
                                 device=torch.device("cpu"), precision=precision, **kw)


def _train_step(task, engine, groups, step: int, scale=None):
    """One optimizer step as the training loop drives it; returns (mean loss, global norm)."""
    precision = engine.precision

    def loss_fn(m):
        batch = task.micro_batch(step, (groups.dp_rank * NUM_MICRO + m) * MICRO, MICRO, seed=7)
        torch.manual_seed(1000 * step + m)
        with precision.autocast("cpu"):
            loss, _ = task.loss(batch)
        return loss, {"loss": float(loss.detach())}

    if scale is not None:
        engine.loss_scale = scale
    logs = engine.forward_backward(NUM_MICRO, loss_fn)
    if scale is not None:
        engine.unscale_grads(1.0 / scale)
    norm = engine.clip_grad_norm(CLIP)
    if math.isfinite(norm):
        engine.step(LR)
    elif scale is not None:
        engine.skip_step()
    else:
        raise FloatingPointError(f"step {step}: global gradient norm {norm} without loss scaling")
    return sum(e["loss"] for e in logs) / NUM_MICRO, norm


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(task, engine, groups, scales):
    """(per step: (mean loss, global norm)), (per step: the parameters after it))."""
    steps, params = [], []
    for s, scale in enumerate(scales):
        steps.append(_train_step(task, engine, groups, s, scale))
        params.append(_params(task.model))
    return steps, params


def _zero_state(engine):
    """Clones of what a skipped step must leave alone: DeepSpeed's fp32 partitions and AdamW's state."""
    zero = engine._zero
    masters = [t.detach().clone() for t in zero.single_partition_of_fp32_groups]
    state = [{k: v.clone() for k, v in zero.optimizer.state[t].items()} for t in zero.single_partition_of_fp32_groups]
    return masters, state


def _same_state(a, b) -> bool:
    (masters_a, state_a), (masters_b, state_b) = a, b
    return (all(torch.equal(x, y) for x, y in zip(masters_a, masters_b)) and len(state_a) == len(state_b)
            and all(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
                    for sa, sb in zip(state_a, state_b)))


def _fp16_run(task, engine, groups):
    """``_run`` over FP16_SCALES, and whether the overflowing step (the second) left the parameters (and
    DeepSpeed's fp32 partitions and AdamW state) bit for bit as they were."""
    steps, params, states = [], [], []
    for s, scale in enumerate(FP16_SCALES):
        states.append(_zero_state(engine) if hasattr(engine, "_zero") else None)
        steps.append(_train_step(task, engine, groups, s, scale))
        params.append(_params(task.model))
    unchanged = all(torch.equal(params[0][n], params[1][n]) for n in params[0])
    if states[1] is not None:
        unchanged = unchanged and _same_state(states[1], states[2])
    return steps, params, unchanged


def _checkpoint_round_trip(cfg, groups, precision, stage):
    """Two steps, the checkpoint's content, a third step; the same content loaded into a fresh engine and
    its third step. Returns (weights == fp32 masters, fp32 weights, third steps bitwise equal)."""
    from deepspeed.utils import safe_get_full_fp32_param

    task, engine = _deepspeed(cfg, groups, precision, stage)
    for s in range(2):
        _train_step(task, engine, groups, s)
    masters = all(torch.equal(p.detach(), safe_get_full_fp32_param(p)) for p in task.model.parameters())
    fp32 = all(p.dtype == torch.float32 for p in task.model.parameters())
    model_state = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    optim_state = copy.deepcopy(engine.checkpoint_optimizer().state_dict())
    _train_step(task, engine, groups, 2)
    task_b, engine_b = _deepspeed(cfg, groups, precision, stage, seed=1)
    task_b.model.load_state_dict(model_state)
    engine_b.checkpoint_optimizer().load_state_dict(optim_state)
    engine_b.after_checkpoint_load()
    _train_step(task_b, engine_b, groups, 2)
    same = (all(torch.equal(p, q) for p, q in zip(task.model.parameters(), task_b.model.parameters()))
            and _same_state(_zero_state(engine), _zero_state(engine_b)))
    return masters, fp32, same


def _comm_dtypes(task, engine):
    """(the dtypes of DeepSpeed's gradient-reduction buckets, {parameter name: its reduction dtype})."""
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    return set(engine._zero.ipg_buckets), {n: get_comm_dtype(p) for n, p in task.model.named_parameters()}


def _worker(rank, world):
    from moe.trainer.config import from_dict
    from parallel import ParallelDims
    from parallel.precision import Precision

    cfg = from_dict(copy.deepcopy(TINY_LM) | {"parallel": {"ep": 2, "zero_stage": 1}})
    groups = ParallelDims.from_world(world, ep=2).build()
    bf16, fp16, fp32 = Precision("bf16"), Precision("fp16"), Precision("fp32")
    out = {"replicated": {}, "deepspeed": {}}
    for precision in (fp32, bf16):
        out["replicated"][precision.name] = _run(*_replicated(cfg, groups, precision), groups, [None] * STEPS)
    out["replicated"]["fp16"] = _fp16_run(*_replicated(cfg, groups, fp16), groups)
    for stage in (1, 2):
        task, engine = _deepspeed(cfg, groups, bf16, stage)
        out["deepspeed"][("bf16", stage)] = _run(task, engine, groups, [None] * STEPS)
        out["deepspeed"][("bf16 dtypes", stage)] = ({p.dtype for p in task.model.parameters()},
                                                    _comm_dtypes(task, engine)[0])
        task, engine = _deepspeed(cfg, groups, fp16, stage)
        out["deepspeed"][("fp16", stage)] = _fp16_run(task, engine, groups)
        out["deepspeed"][("fp16 counters", stage)] = (engine.ds.skipped_steps, engine.ds.global_steps,
                                                      engine._step_count())
        out["deepspeed"][("checkpoint", stage)] = _checkpoint_round_trip(cfg, groups, bf16, stage)
    task, engine = _deepspeed(cfg, groups, bf16, 2, reduce_dtype=torch.bfloat16)
    out["deepspeed"]["bf16 reduce"] = _run(task, engine, groups, [None] * STEPS)
    out["deepspeed"]["bf16 reduce dtypes"] = _comm_dtypes(task, engine)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, 2, timeout=300)


def _differences(run, oracle, upto: int):
    """Over steps 1..``upto``: (max relative loss difference, max relative difference of the finite norms,
    the parameter that differs most after step ``upto``, its relative L2 difference)."""
    (steps, params), (ref_steps, ref_params) = run[:2], oracle[:2]
    pairs = list(zip(steps, ref_steps))[:upto]
    loss = max(abs(a[0] - b[0]) / abs(b[0]) for a, b in pairs)
    norm = max((abs(a[1] - b[1]) / abs(b[1]) for a, b in pairs if math.isfinite(b[1])), default=0.0)
    after, ref_after = params[upto - 1], ref_params[upto - 1]
    worst = max(ref_after, key=lambda n: relative_error(after[n], ref_after[n]))
    return loss, norm, worst, relative_error(after[worst], ref_after[worst])


def _assert_tracks(run, oracle, what, first=(LOSS_RTOL, NORM_RTOL, PARAM_RTOL), every=ROUND_OFF):
    """Step 1 (the same weights in) within ``first``, steps 1..STEPS within ``every`` (the module doc)."""
    for upto, rtol in ((1, first), (STEPS, every)):
        loss, norm, worst, param = _differences(run, oracle, upto)
        assert loss <= rtol[0], f"{what}: train loss differs by {loss:.2e} (relative) in steps 1-{upto}"
        assert norm <= rtol[1], f"{what}: global gradient norm differs by {norm:.2e} (relative) in steps 1-{upto}"
        assert param <= rtol[2], f"{what}: parameter {worst} differs by {param:.2e} (relative L2) after step {upto}"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_tracks_the_replicated_bf16_run_with_fp32_weights(ranks, stage):
    for rank, out in enumerate(ranks):
        oracle = out["replicated"]["bf16"]
        # the step-1 tolerances tell bf16 from fp32: the replicated fp32 run is outside them
        loss, norm, _, param = _differences(out["replicated"]["fp32"], oracle, 1)
        assert loss > LOSS_RTOL and norm > NORM_RTOL and param > PARAM_RTOL, (loss, norm, param)
        _assert_tracks(out["deepspeed"][("bf16", stage)], oracle, f"rank {rank} zero {stage} bf16")
        param_dtypes, bucket_dtypes = out["deepspeed"][("bf16 dtypes", stage)]
        assert param_dtypes == {torch.float32}  # DeepSpeed's bf16 mode would have cast the model
        assert bucket_dtypes == {torch.float32}  # gradients reduced in fp32 by default


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_gradient_reduction_is_opt_in_and_within_bf16_round_off(ranks):
    for rank, out in enumerate(ranks):
        buckets, comm = out["deepspeed"]["bf16 reduce dtypes"]
        assert buckets == {torch.float32, torch.bfloat16}
        for name, dtype in comm.items():  # the matmul weights' gradients in bf16; router, norms, embeddings fp32
            matmul = ".attn." in name or ".mlp." in name or ".experts." in name
            assert dtype == (torch.bfloat16 if matmul else torch.float32), (name, dtype)
        assert any(".experts." in n for n in comm) and any(".router." in n for n in comm)
        run, oracle = out["deepspeed"]["bf16 reduce"], out["replicated"]["bf16"]
        per_step = (BF16_EPS, BF16_EPS, STEPS * BF16_EPS)
        _assert_tracks(run, oracle, f"rank {rank} zero 2 bf16 reduce", first=per_step, every=per_step)
        _, norm, _, param = _differences(run, oracle, 1)
        assert norm > NORM_RTOL and param > PARAM_RTOL  # bf16 round-off really entered the reduction


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_overflow_is_skipped_and_scaled_steps_track_the_replicated_run(ranks, stage):
    for rank, out in enumerate(ranks):
        steps, _, unchanged = run = out["deepspeed"][("fp16", stage)]
        ref_steps, _, ref_unchanged = oracle = out["replicated"]["fp16"]
        assert math.isinf(steps[1][1]), steps  # 2^120: overflow (DeepSpeed's norm is inf, torch's may be nan)
        assert not math.isfinite(ref_steps[1][1]), ref_steps
        assert all(math.isfinite(s[1]) for s in steps[::2])
        assert unchanged and ref_unchanged  # parameters, fp32 masters and AdamW state, bit for bit
        skipped, global_steps, adam_steps = out["deepspeed"][("fp16 counters", stage)]
        assert (skipped, global_steps, adam_steps) == (1, 3, 2.0)
        _assert_tracks(run, oracle, f"rank {rank} zero {stage} fp16")  # the true (unscaled) norm, the step


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_checkpoint_holds_fp32_masters_and_resumes_exactly(ranks, stage):
    for rank, out in enumerate(ranks):
        masters, fp32, same = out["deepspeed"][("checkpoint", stage)]
        assert masters and fp32, f"rank {rank} zero {stage}: the model's weights are not the fp32 masters"
        assert same, f"rank {rank} zero {stage}: the resumed step differs from the uninterrupted one"


def test_reduce_dtype_is_checked():
    from parallel.precision import Precision
    from parallel.zero_deepspeed import precision_config

    assert "torch_autocast" not in precision_config(Precision("fp16"))
    assert precision_config(Precision("bf16"))["torch_autocast"]["lower_precision_safe_modules"] == []
    with pytest.raises(ValueError, match=r"reduce_dtype=torch.bfloat16 with precision 'fp16'; allowed: "
                                         r"torch.float32 \(bf16 gradient reduction needs precision 'bf16'\)"):
        precision_config(Precision("fp16"), torch.bfloat16)
    with pytest.raises(ValueError, match=r"reduce_dtype=torch.float16 with precision 'bf16'; allowed: "
                                         r"torch.float32, torch.bfloat16"):
        precision_config(Precision("bf16"), torch.float16)




def test_bf16_reduction_classes_and_the_moe_marker_size_come_from_the_expert_parameters():
    """reduce_dtype=bf16 names nn.Linear and the class holding the expert parameters (never the router), as
    DeepSpeed imports them; DeepSpeed's MoE marker reports the expert stacks' E_l x ep (E_l = 4 here)."""
    from moe.models import LanguageModel, LMConfig
    from parallel.precision import Precision
    from parallel.zero_deepspeed import _global_experts, low_precision_comm_modules, precision_config

    model = LanguageModel(LMConfig.from_dict({"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ffn": 16,
                                              "max_seq_len": 8, "moe_every": 2, "moe": {"num_experts": 4}}))
    names = low_precision_comm_modules(model)
    assert names == ["torch.nn.modules.linear.Linear", "moe.experts.Experts"]
    assert precision_config(Precision("bf16"), torch.bfloat16, names)["torch_autocast"][
        "lower_precision_safe_modules"] == names
    assert precision_config(Precision("bf16"), torch.float32, names)["torch_autocast"][
        "lower_precision_safe_modules"] == []
    assert (_global_experts(model, 1), _global_experts(model, 2)) == (4, 8)
