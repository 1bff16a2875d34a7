"""OneS distillation: a trained `moe` policy's experts gathered into a dense Llama student
(agents/ones.py), then the student trained to match the mixture's next-token distributions.

    loss = τ² · KL(p_T^τ ‖ p_S^τ) + lm_coef · CE(student, demo tokens)

on the recipe's SFT demonstrations (algos/recipes.py: build_examples; batches as in SFT), over
the positions SFT trains on (those predicting a token the policy writes), p^τ = softmax(logits/τ).
The optimiser, schedule, batch size and precision are the recipe's `sft` and `runtime` ones, at
LR_SCALE × sft.lr unless `lr` is given; the steps are `steps` (default sft.steps). Gathering
measures the mixture's gates on calibration tokens from the same demos; the KL to the teacher is
measured on held-out demos (up to 64, never trained on) right after gathering and after
distillation.

The output folder is a policy folder (save_pretrained + tokenizer, what eval, `rl.init_from` and
vLLM read) with `distill.json` (the measurements) and the metrics log beside the weights.
`distill` (the `launch.py distill` job) then evaluates the student and the teacher on the held-out
split, and with a dense `baseline` of the same budget reports the share of the mixture's gain the
student keeps: (acc_student − acc_dense) / (acc_moe − acc_dense).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from agents.model import count_parameters
from agents.moe import parameter_counts
from agents.ones import GATHERS, calibration_inputs, check_teacher, gather_dense, gathered_width
from algos.checkpoint import load_policy, policy_folder, save_policy
from algos.config import Experiment
from algos.data import prepare_data, read_jsonl
from algos.metrics import MetricsLogger
from algos.runtime import autocast, init_deepspeed, param_dtype, resolve_runtime, seed_everything
from algos.sft import IGNORE, BucketedBatches, Example, collate, lr_lambda

# The distillation rate is sft.lr times this: the student starts next to the teacher, and SFT's
# from-scratch rate throws the gathering away in its first Adam steps (a tiny svd student: held-out
# KL 5e-5 after gathering, 4.5 after one step at sft.lr = 3e-3; 20 steps at 1e-4 beat 3e-4 for
# every method on the tiny recipe).
LR_SCALE = 0.03


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """τ² · mean over the positions where `mask` [B, L] is true of KL(p_T^τ ‖ p_S^τ); logits [B, L, V]."""
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)  # [N, V]
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    return temperature**2 * (t.exp() * (t - s)).sum(-1).mean()


def _positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, L-1] of the positions SFT trains on, their next tokens [B, L-1])."""
    labels = batch["labels"][:, 1:]
    return labels != IGNORE, labels


def distill_loss(engine, teacher, batch: dict[str, torch.Tensor], temperature: float, lm_coef: float,
                 precision: str = "fp32") -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's loss (module docstring) and its parts {kl, lm_loss}."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), autocast(precision, batch["input_ids"].device):
        teacher_logits = teacher(**inputs).logits[:, :-1]  # [B, L-1, V]
    student_logits = engine(**inputs).logits[:, :-1]
    mask, targets = _positions(batch)
    kl = kl_to_teacher(student_logits, teacher_logits, mask, temperature)
    lm = F.cross_entropy(student_logits[mask].float(), targets[mask])
    loss = kl + lm_coef * lm if lm_coef else kl
    return loss, {"kl": kl.item(), "lm_loss": lm.item()}


@torch.no_grad()
def heldout_kl(student, teacher, examples: list[Example], pad_id: int, device, batch_size: int = 16,
               precision: str = "fp32") -> float:
    """KL(p_T ‖ p_S) (τ = 1) averaged over every trained-on position of `examples`."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with autocast(precision, device):
            s, t = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
        mask, _ = _positions(batch)
        n = int(mask.sum())
        if n:
            total += float(kl_to_teacher(s, t, mask)) * n
            count += n
    return total / max(count, 1)


def load_teacher(folder: str | Path, device, dtype):
    """(model, tokenizer, folder) of a trained moe run, checkpoint or policy folder; a folder
    holding another model type is refused before its weights are read, naming both."""
    folder = policy_folder(folder)
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind != "qwen2_moe":
        raise ValueError(f"--teacher {folder} holds a {kind} model, not a model.arch=moe one (model_type "
                         "qwen2_moe): OneS distils a mixture of experts into a dense student")
    model, tokenizer = load_policy(folder, device=device, dtype=dtype)
    check_teacher(model)
    return model, tokenizer, folder


def distill_to_dense(exp: Experiment, teacher_folder: str | Path, out_folder: str | Path, gather: str = "svd",
                     steps: int | None = None, width: int | None = None, lm_coef: float = 0.0,
                     temperature: float = 1.0, lr: float | None = None, calib_tokens: int = 8192,
                     heldout: int = 64, progress: bool = True) -> dict:
    """Gather `teacher_folder`'s moe policy into a dense student by `gather`, distil it for `steps`
    (default sft.steps) on the recipe's demos, save it to `out_folder`; returns the measurements
    (also in out_folder/distill.json)."""
    if gather not in GATHERS:
        raise ValueError(f"--gather={gather!r} is not one of {', '.join(GATHERS)}")
    from algos.recipes import build_examples  # the SFT examples (recipes imports no distill)

    cfg, out = exp.sft, Path(out_folder)
    steps = cfg.steps if steps is None else steps
    lr = cfg.lr * LR_SCALE if lr is None else lr
    seed_everything(exp.seed)
    device = resolve_runtime(exp.runtime)  # resolves runtime.precision=auto too
    dtype = param_dtype(exp.runtime.precision)
    teacher, tokenizer, teacher_folder = load_teacher(teacher_folder, device, dtype)
    teacher.requires_grad_(False)
    gathered_width(teacher, gather, width)  # a width the method cannot take fails before any data is read

    examples = build_examples(exp, read_jsonl(prepare_data(exp) / "train_demos.jsonl"), tokenizer)
    order = np.random.default_rng(exp.seed).permutation(len(examples))
    n_held = min(heldout, max(1, len(examples) // 10)) if len(examples) > 1 else 0
    held = [examples[i] for i in order[:n_held]]
    train = [examples[i] for i in order[n_held:]] or held
    pad = tokenizer.pad_token_id

    # gather: the teacher's gates measured on the first training demos' tokens
    calib = (collate(train[i : i + cfg.batch_size], pad, device) for i in range(0, len(train), cfg.batch_size))
    with autocast(exp.runtime.precision, device):
        inputs = calibration_inputs(teacher, calib, max_tokens=calib_tokens)
    t0 = time.perf_counter()
    student = gather_dense(teacher, gather, width=width, inputs=inputs).to(device=device, dtype=dtype)
    gather_s = time.perf_counter() - t0
    del inputs
    kl_before = heldout_kl(student, teacher, held, pad, device, cfg.batch_size, exp.runtime.precision)
    n_teacher, n_active = parameter_counts(teacher)
    tqdm.write(f"OneS: {gather} gathering of {teacher_folder} ({n_teacher / 1e6:.2f}M parameters, "
               f"{n_active / 1e6:.2f}M active) into a dense llama of FFN width {student.config.intermediate_size} "
               f"({count_parameters(student) / 1e6:.2f}M); held-out KL to the teacher {kl_before:.4g}")

    # distil
    torch.manual_seed(exp.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, max(steps, 1),
                                                                       cfg.min_lr_ratio))
    engine = init_deepspeed(student, optimizer, scheduler, exp.runtime, cfg.batch_size, cfg.grad_accum, cfg.grad_clip)
    batches = BucketedBatches([len(e.input_ids) for e in train], cfg.batch_size, exp.seed)
    log = MetricsLogger(out)
    bar = tqdm(total=steps, desc=f"distill ({gather})", disable=not progress, dynamic_ncols=True)
    engine.train()
    t0, tokens = time.perf_counter(), 0
    for step in range(1, steps + 1):
        parts = {"kl": 0.0, "lm_loss": 0.0}
        for micro in range(cfg.grad_accum):
            batch = collate([train[i] for i in batches[(step - 1) * cfg.grad_accum + micro]], pad, engine.device)
            loss, stats = distill_loss(engine, teacher, batch, temperature, lm_coef, exp.runtime.precision)
            engine.backward(loss)
            engine.step()
            for k, v in stats.items():
                parts[k] += v / cfg.grad_accum
            tokens += int(batch["attention_mask"].sum())
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps:
            dt = time.perf_counter() - t0
            log.log(step, {**parts, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / dt}, prefix="distill/")
            bar.set_postfix(kl=f"{parts['kl']:.4f}", tok_s=f"{tokens / dt:.0f}")
            t0, tokens = time.perf_counter(), 0
    bar.close()
    engine.eval()
    kl_after = heldout_kl(engine.module, teacher, held, pad, device, cfg.batch_size, exp.runtime.precision)
    log.log(steps, {"heldout_kl_before": kl_before, "heldout_kl_after": kl_after}, prefix="distill/")
    log.close()

    save_policy(engine, tokenizer, out)
    report = {
        "teacher": str(teacher_folder), "gather": gather, "width": student.config.intermediate_size,
        "steps": steps, "lr": lr, "lm_coef": lm_coef, "temperature": temperature, "gather_seconds": gather_s,
        "heldout_demos": len(held), "heldout_kl_before": kl_before, "heldout_kl_after": kl_after,
        "teacher_parameters": n_teacher, "teacher_active_parameters": n_active,
        "student_parameters": count_parameters(student), "folder": str(out),
    }
    (out / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    tqdm.write(f"distilled {steps} steps: held-out KL {kl_before:.4g} -> {kl_after:.4g}; student in {out}")
    if kl_after > kl_before:  # a gathering this close leaves Adam's step noise as the larger error
        tqdm.write("note: distillation raised the held-out KL; the gathered student (--steps 0) is the closer one")
    return report


def kept_gain(student: float, teacher: float, dense: float) -> float | None:
    """The share of the mixture's gain over the dense baseline that the student keeps (the
    paper's "MoE benefit"): (student − dense) / (teacher − dense); None without a gain to keep."""
    return None if teacher == dense else (student - dense) / (teacher - dense)


def distill(exp: Experiment, teacher: str | Path, out: str | Path, gather: str = "svd", steps: int | None = None,
            width: int | None = None, baseline: str | Path | None = None) -> dict:
    """`launch.py distill`: distil, then evaluate the student, the teacher (and a dense baseline)
    on the held-out split: accuracy and rollout tokens/s each, the student's speedup and, with a
    baseline, the kept share of the mixture's gain. Everything lands in out/distill.json."""
    from algos.recipes import evaluate

    out = Path(out)
    report = distill_to_dense(exp, teacher, out, gather=gather, steps=steps, width=width)
    evals = {"student": evaluate(exp.model_copy(update={"out_dir": str(out)}), out),
             "teacher": evaluate(exp.model_copy(update={"out_dir": str(out / "teacher")}), report["teacher"])}
    if baseline is not None:
        evals["baseline"] = evaluate(exp.model_copy(update={"out_dir": str(out / "baseline")}), baseline)
    for name, summary in evals.items():
        report[f"{name}_accuracy"] = summary["accuracy"]
        report[f"{name}_tokens_per_s"] = summary["tokens_per_s"]
    report["speedup"] = report["student_tokens_per_s"] / max(report["teacher_tokens_per_s"], 1e-9)
    if baseline is not None:
        report["kept_gain"] = kept_gain(report["student_accuracy"], report["teacher_accuracy"],
                                        report["baseline_accuracy"])
    (out / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    kept = f", kept gain {report['kept_gain']:.1%}" if report.get("kept_gain") is not None else ""
    print(f"OneS {gather}: student accuracy {report['student_accuracy']:.1%} at {report['student_tokens_per_s']:.0f} "
          f"tok/s, teacher {report['teacher_accuracy']:.1%} at {report['teacher_tokens_per_s']:.0f} tok/s "
          f"(speedup {report['speedup']:.2f}x){kept}")
    return report
