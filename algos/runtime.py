"""Device, precision, seeding and the DeepSpeed engine — the learner's plumbing in one place."""
from __future__ import annotations

import logging
import os
import random
import socket
import time
import warnings
from typing import Any

import numpy as np
import torch

from algos.config import RuntimeConfig
from rollout.machine import free_cores, native_bf16

# runtime.precision -> torch dtype: the weights' dtype for fp32/bf16/fp16, the matmuls' for amp_*
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(precision: str) -> torch.dtype:
    """The dtype the learner keeps weights in (autocast modes keep fp32 weights)."""
    return DTYPES.get(precision, torch.float32)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype amp_* precisions autocast matmuls to; None for the others."""
    return DTYPES[precision.removeprefix("amp_")] if precision.startswith("amp_") else None


def autocast(precision: str, device: torch.device):
    """The autocast context of `precision` for passes run outside the engine (no-grad passes)."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def full_state_dict(engine, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of `engine.module`'s whole state dict (cast to `dtype` if given); under ZeRO-3
    the partitioned parameters are gathered first. Tied weights (the LM head and the embedding)
    stay one tensor, so save_pretrained still sees them as tied."""
    module = engine.module

    def copy() -> dict[str, torch.Tensor]:
        def storage(v: torch.Tensor) -> tuple:  # one tensor seen under two names (tied weights)
            return v.data_ptr(), v.shape, v.stride(), v.dtype

        copies: dict[tuple, torch.Tensor] = {}
        for v in module.state_dict().values():
            if storage(v) not in copies:
                copies[storage(v)] = (v.detach() if dtype is None else v.detach().to(dtype)).cpu().clone()
        return {k: copies[storage(v)] for k, v in module.state_dict().items()}

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return copy()
    return copy()


def resolve_runtime(cfg: RuntimeConfig) -> torch.device:
    """The device this process runs on (runtime.device; auto = this process's CUDA device if it has
    one), with runtime.precision=auto resolved in place for it: amp_bf16 where bf16 is native
    (native_bf16), else fp32. Each process resolves its own (a CPU driver and GPU learner ranks
    differ). An explicit bf16 precision on a CPU that emulates it is kept, with a warning."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but torch sees no CUDA device; use runtime.device=cpu or auto")
    if cfg.device == "auto":
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                  else torch.device("cpu"))
    else:
        device = torch.device(cfg.device)
    if cfg.precision == "auto":
        cfg.precision = "amp_bf16" if native_bf16(device) else "fp32"
    elif "bf16" in cfg.precision and device.type == "cpu" and not native_bf16(device):
        warnings.warn(f"runtime.precision={cfg.precision} on a CPU without AVX512-BF16 or AMX: bf16 is emulated "
                      "here and training runs ~10x slower than fp32; runtime.precision=auto picks fp32 on such CPUs")
    return device


def optimizer_options(cfg: RuntimeConfig, optimizer_cls) -> dict:
    """Extra keyword arguments for the learners' optimizer: under runtime.compile a torch Adam or
    AdamW takes its fused kernel (one op for all parameters instead of ~10 per parameter)."""
    return {"fused": True} if cfg.compile and optimizer_cls in (torch.optim.Adam, torch.optim.AdamW) else {}


def compile_for_training(module: torch.nn.Module, cfg: RuntimeConfig, device: torch.device) -> None:
    """runtime.compile: compile `module` in place (its state-dict names and its parameters stay as
    they are, so DeepSpeed, checkpoints and weight syncs see the same module). On CPU a
    transformers model switches to its eager attention (matmuls + softmax) first: inductor fuses
    that, where torch's CPU flash-attention kernel has a slow backward. Shapes that change (each
    micro-batch is cut to its longest sequence) make one more, dynamic-shape, compile."""
    if not cfg.compile:
        return
    if device.type == "cpu" and hasattr(module, "set_attn_implementation"):
        module.set_attn_implementation("eager")
    module.compile()


def busy_cores_notice(threads: int, cores: int) -> str | None:
    """A notice when the 1-minute load average says other processes keep some of the `cores` busy,
    so `threads` torch threads would contend with them: OpenMP threads sharing their cores with
    another busy process slowed an SFT step from ~0.1 s to 2-3.7 s here (2 threads on 2 cores
    beside another job). Called once, before this process starts work of its own."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    load -= own_cpu_rate()  # this process's own work (an earlier stage, a test session) is not contention
    busy = int(load + 0.25)  # cores other processes keep running (a load of 0.75 counts as one)
    if threads + busy <= cores:
        return None
    if busy == 0:
        return (f"{threads} torch threads on the {cores} cores this process may use: the extra threads contend for "
                f"them (a step ran 20x slower so); set runtime.threads={cores} or fewer")
    return (f"the load average is {load:.1f} on the {cores} cores this process may use: other jobs keep ~{busy} "
            f"of them busy, and torch's {threads} threads will contend with them (a step ran 20x slower so); wait "
            f"for them, or set runtime.threads={max(1, cores - busy)}")


def own_cpu_rate() -> float:
    """Cores this process has kept busy on average since it started (its CPU time / its age)."""
    try:
        import psutil  # Ray's dependency

        age = time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - no psutil, no /proc: count nothing as our own
        return 0.0
    return time.process_time() / age if age > 1 else 0.0


def apply_threads(cfg: RuntimeConfig) -> int:
    """Set torch's intra-op threads: runtime.threads, else the cores free to this process; warn
    when the machine's load says those cores are busy. Returns the thread count."""
    cores = free_cores()
    threads = cfg.threads or cores
    torch.set_num_threads(threads)
    if notice := busy_cores_notice(threads, cores):
        warnings.warn(notice)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_rank_world() -> tuple[int, int]:
    """(this process's rank, the world size) of the torch.distributed group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (itself in a world of one), on t's device. NCCL reduces only CUDA
    tensors, so on GPUs a CPU tensor makes the trip through the GPU."""
    import torch.distributed as dist

    if dist_rank_world()[1] == 1:
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        out = t.cuda()
        dist.all_reduce(out)
        return out.to(t.device)
    dist.all_reduce(t)
    return t


def grad_norm(engine) -> float | None:
    """The 2-norm of `engine`'s whole gradient at the accumulation boundary, before its step; None
    under ZeRO ≥ 1, whose partitioned optimizer computes it in the step (get_global_grad_norm()).
    Without ZeRO every rank holds the all-reduced gradient, so the local norm is the global one."""
    if engine is None or engine.zero_optimization_stage() > 0:
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def barrier() -> None:
    import torch.distributed as dist

    if dist_rank_world()[1] > 1:
        dist.barrier()


# Marks the torch.distributed variables as ours (a world of one), not a launcher's or a rank's.
WORLD_OF_ONE = "TURNSTILE_WORLD_OF_ONE"


def ensure_process_group_env() -> None:
    """A plain `python launch.py ...` is a world of one: give torch.distributed what a launcher would.

    Variables a launcher or a learner rank (algos/ranks.py) set are left alone. Ours get a fresh
    free port before every new process group: a port picked for an earlier group (a job that runs
    SFT, then RL, in one process) may be another process's by now, and a child process (a Ray
    task of `launch.py sweep --ray`) inherits the parent's variables along with its port.
    """
    import torch.distributed as dist

    ours = os.environ.get(WORLD_OF_ONE) == "1" or "MASTER_PORT" not in os.environ
    if ours and not (dist.is_available() and dist.is_initialized()):
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "LOCAL_RANK": "0", "WORLD_SIZE": "1", WORLD_OF_ONE: "1"})
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def deepspeed_config(cfg: RuntimeConfig, micro_batch: int, grad_accum: int, grad_clip: float) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # ZeRO accepts only the optimizers DeepSpeed has tested (its own, torch's Adam/AdamW) unless
        # told otherwise; the learners take any torch optimizer (the tests pass SGD)
        "zero_allow_untested_optimizer": True,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    elif cfg.precision.startswith("amp_"):
        ds["torch_autocast"] = {"enabled": True, "dtype": str(autocast_dtype(cfg.precision)).removeprefix("torch.")}
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        ds["zero_force_ds_cpu_optimizer"] = False  # we pass a torch optimizer: no native-op build
    return ds


def init_deepspeed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: RuntimeConfig,
                   micro_batch: int, grad_accum: int, grad_clip: float):
    """Wrap model + torch optimizer in a DeepSpeed engine (gloo single process on CPU)."""
    ensure_process_group_env()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say it, rather than have DeepSpeed warn
    import deepspeed  # imported late: it is slow to import and prints on import

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        # DeepSpeed's shared-memory all-reduce op for CPU ranks costs a ~1 min native compile on
        # first use (FACTS.md) and only speeds up ranks on one node; gloo's all-reduce does the same
        # job, so it is skipped (a world of one never all-reduces at all).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, micro_batch, grad_accum, grad_clip),
        dist_init_required=True,
    )
    return engine
