"""Checkpoints: a `save_pretrained` policy folder plus the learner's full state, resumable exactly.

Layout of one checkpoint (`<run>/checkpoints/step_0000200/`):
    model/     save_pretrained weights + config + tokenizer (what eval, vLLM and users load)
    learner/   the DeepSpeed checkpoint: (ZeRO-partitioned) weights, optimizer, LR scheduler
    critic/    the same for PPO's critic (its own engine and optimizer)
    state.pt   step, data cursor, RNG states, anything the loop needs to continue
    COMPLETE   written last: a checkpoint without it was cut off mid-save and is ignored
It is written as `.partial_step_0000200/` and renamed into place when complete;
`<run>/checkpoints/latest` names the newest complete one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from agents.model import PolicyLoadError, load_pretrained
from algos.run_folder import storage_error
from algos.runtime import barrier, dist_rank_world, full_state_dict

COMPLETE = "COMPLETE"
PARTIAL = ".partial_"  # a checkpoint being written: renamed to step_* when complete


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, step: int, engine, tokenizer, state: dict[str, Any], keep: int,
                    critic=None) -> Path:
    """Write checkpoint `step` (the policy's engine, and PPO's critic engine when given) into a
    hidden `.partial_step_*` folder, and rename it into place only when complete (COMPLETE inside,
    then the `latest` pointer): a save cut off midway, by a kill or a full disk, is never resumed
    from, and the previous checkpoint stays valid. A failed write removes the partial folder and
    raises RunFolderError saying what ran out and where.

    With several learner ranks every rank calls this (DeepSpeed writes each rank's partition of the
    weights and optimizer; under ZeRO-3 gathering the weights is collective too) and rank 0 writes
    the rest: the folder must be one all ranks see (a shared filesystem on a cluster)."""
    rank = dist_rank_world()[0]
    root = checkpoint_root(run_dir)
    ck = root / f"step_{step:07d}"
    partial = root / f"{PARTIAL}{ck.name}"
    try:
        if rank == 0:
            for stale in root.glob(f"{PARTIAL}*"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(partial / "learner"), tag="state")
        if critic is not None:
            critic.save_checkpoint(str(partial / "critic"), tag="state")
        save_policy(engine, tokenizer, partial / "model")
        if rank == 0:
            torch.save(state, partial / "state.pt")
            (partial / COMPLETE).touch()
    except (OSError, RuntimeError) as e:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise storage_error(e, root, f"writing checkpoint {ck.name}") from e
    if rank == 0:
        if ck.exists():  # the same step saved again (a resumed run): the new one replaces it
            old = root / f"{PARTIAL}old_{ck.name}"
            os.replace(ck, old)
            os.replace(partial, ck)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, ck)
        _write_atomic(root / "latest", ck.name)
        complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists())
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return ck


def save_policy(engine, tokenizer, folder: Path) -> None:
    """save_pretrained of the engine's policy (its weights gathered first under ZeRO-3: with several
    ranks, every rank calls this and rank 0 writes)."""
    weights = full_state_dict(engine)
    if dist_rank_world()[0] == 0:
        engine.module.save_pretrained(folder, state_dict=weights)
        tokenizer.save_pretrained(folder)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        ck = root / pointer.read_text().strip()
        if (ck / COMPLETE).exists():
            return ck
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


def load_learner_state(ck: Path, engine, critic=None) -> dict[str, Any]:
    """Restore weights/optimizer/scheduler into `engine` (and `critic`); return the loop state
    saved beside them."""
    if not (ck / COMPLETE).exists():
        raise CheckpointError(f"{ck} is not a complete checkpoint (no {COMPLETE} marker)")
    for name, eng in (("learner", engine), ("critic", critic)):
        if eng is None:
            continue
        try:
            path, _ = eng.load_checkpoint(str(ck / name), tag="state")
        except (RuntimeError, KeyError) as e:  # a state of another shape: other model or learner layout
            raise CheckpointError(
                f"the {name} state under {ck / name} does not fit this run's learner ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}); a checkpoint written before the actor and critic got their own "
                "engines, or by another model config, cannot be resumed: start the RL stage afresh") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the {name} state under {ck / name}")
    return torch.load(ck / "state.pt", weights_only=False)


def policy_folder(path: str | Path) -> Path:
    """Accept a run folder, a checkpoint folder or a save_pretrained folder; return the latter."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "checkpoints").is_dir():  # a run folder: its newest checkpoint
        ck = latest_checkpoint(path)
        if ck is None:
            raise CheckpointError(f"{path} is a run folder with no complete checkpoint yet")
        path = ck
    if (path / "model").is_dir():
        path = path / "model"
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} holds no model (no config.json): pass a run, checkpoint or model folder")
    return path


def load_policy(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from any folder `policy_folder` accepts, with a clear error if unreadable."""
    try:
        return load_pretrained(policy_folder(path), device=device, dtype=dtype)
    except PolicyLoadError as e:
        raise CheckpointError(str(e)) from None
