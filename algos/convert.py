"""`launch.py convert`: a trained dense policy -> a `factor` policy (FactorLLM, agents/factor.py).

    1. split: each SwiGLU FFN into E experts by contiguous neuron slices (their sum is the dense
       FFN exactly), a freshly initialised router per layer (`agents.factor.split_dense`)
    2. train the routers, everything else frozen, on the recipe's SFT demonstrations (the examples
       and batches SFT makes: algos/recipes.build_examples, algos/sft.BucketedBatches / collate):
           loss = 0.05 L_PA + 0.01 L_bal            (each averaged over layers; agents/factor.py)
       L_PA teaches each router which slices best stand in for the dense FFN. `lm_loss=True`
       (launch.py convert --lm-loss) adds the LM loss, which reaches the routers through the
       top-k weights: lower LM loss, but the routers then drift from the PA teacher
       (docs/backbones.md has both measured)
    3. measure on held-out demonstrations (the last `heldout` of the demo file, never trained on
       here), before and after step 2: the LM loss of both models, greedy agreement with the dense
       teacher (teacher-forced argmax), the PA loss; and the FFN FLOPs per token. A dense policy
       SFT-trained on the same recipe has seen those demos: raise sft.demos.num_examples for the
       conversion (the demo file grows at its end) to hold out demos neither model saw
    4. write a policy folder (save_pretrained + the dense policy's tokenizer + convert.json with
       the numbers) that `rl.init_from` and `sft.init_from` start from

E and k: the recipe's model.num_experts / model.top_k when its model.arch is factor, else the
factor defaults (8, 4).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agents.factor import ffn_flops_per_token, parameter_counts, recording, routers, split_dense
from agents.model import ARCH_KEYS, ARCH_MODULES, arch_module, auxiliary_losses
from algos.checkpoint import load_policy, policy_folder
from algos.config import Experiment
from algos.data import prepare_data, read_jsonl
from algos.recipes import build_examples
from algos.runtime import resolve_runtime
from algos.sft import IGNORE, BucketedBatches, Example, collate


def source_arch(model_type: str | None) -> str | None:
    """The model.arch of a saved folder's `model_type` (None: not one of ours)."""
    if model_type in ("llama", "qwen2_moe"):
        return {"llama": "llama", "qwen2_moe": "moe"}[model_type]
    return next((a for a in ARCH_MODULES if getattr(arch_module(a), "MODEL_TYPE", None) == model_type), None)


def convert_to_factor(exp: Experiment, source_folder: str | Path, out_folder: str | Path, steps: int,
                      lr: float = 1e-2, heldout: int = 64, batch_size: int | None = None, lm_loss: bool = False,
                      progress: bool = True) -> dict:
    """Convert the dense policy in `source_folder` (a run, checkpoint or model folder) into a factor
    policy in `out_folder`, its routers trained `steps` steps; returns the report (also written to
    out_folder/convert.json)."""
    if exp.model.arch == "factor":
        num_experts, top_k = exp.model.num_experts, exp.model.top_k
    else:
        num_experts, top_k = ARCH_KEYS["factor"]["num_experts"], ARCH_KEYS["factor"]["top_k"]
    src = policy_folder(source_folder)
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    if model_type not in ("llama", "turnstile_llama"):  # turnstile_llama: a dense policy with context_broadcast
        raise ValueError(f"{src} holds a {model_type} model (model.arch={source_arch(model_type)}); launch.py "
                         "convert factorises a dense policy (model.arch=llama)")
    device = resolve_runtime(exp.runtime)
    dense, tokenizer = load_policy(src, device=device)
    torch.manual_seed(exp.seed)  # the routers' initialisation
    model = split_dense(dense, num_experts, top_k)

    demos = read_jsonl(prepare_data(exp) / "train_demos.jsonl")
    examples = build_examples(exp, demos, tokenizer)
    n_held = min(heldout, len(examples) // 2)
    train, held = examples[: len(examples) - n_held], examples[len(examples) - n_held :]
    batch_size = batch_size or exp.sft.batch_size
    pad = tokenizer.pad_token_id

    before = compare(dense, model, held, pad, batch_size, device)
    t0 = time.perf_counter()
    losses = train_routers(model, train, pad, steps, batch_size, lr, exp.seed, device, lm_loss, progress)
    train_s = time.perf_counter() - t0
    after = compare(dense, model, held, pad, batch_size, device)

    total, active = parameter_counts(model)
    report = {
        "source": str(src), "num_experts": num_experts, "top_k": top_k, "steps": steps, "lr": lr, "lm_loss": lm_loss,
        "train_examples": len(train), "heldout_examples": len(held), "train_seconds": round(train_s, 2),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "before": before, "after": after,
        "parameters": total, "active_parameters": active,
        "ffn_flops_per_token_per_layer": ffn_flops_per_token(model.config),
    }
    out = Path(out_folder)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "convert.json").write_text(json.dumps(report, indent=2))
    flops = report["ffn_flops_per_token_per_layer"]
    tqdm.write(f"factor E={num_experts} k={top_k}: held-out LM loss dense {after['dense_lm_loss']:.4f}, factor "
               f"{before['factor_lm_loss']:.4f} -> {after['factor_lm_loss']:.4f} after {steps} router steps; "
               f"greedy agreement {before['greedy_agreement']:.1%} -> {after['greedy_agreement']:.1%}; "
               f"FFN FLOPs {flops['ratio']:.1%} of dense; written to {out}")
    return report


def train_routers(model, examples: list[Example], pad_id: int, steps: int, batch_size: int, lr: float, seed: int,
                  device, lm_loss: bool = False, progress: bool = True) -> list[float]:
    """`steps` AdamW steps on the routers only (every other parameter frozen) of the backbone's
    auxiliary losses (0.05 L_PA + 0.01 L_bal), plus the LM loss if `lm_loss`; returns each step's loss."""
    model.requires_grad_(False)
    params = [r.weight for r in routers(model)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = BucketedBatches([len(e.input_ids) for e in examples], batch_size, seed)
    model.train()  # no dropout in the Llama layers: train mode only makes the routers record
    losses = []
    bar = tqdm(range(steps), desc="convert: routers", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = collate([examples[i] for i in batches[step]], pad_id, device)
        lm = model(**batch).loss
        aux, stats = auxiliary_losses(model, batch["attention_mask"])
        loss = lm + aux if lm_loss else aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(lm=f"{float(lm.detach()):.3f}", pa=f"{float(stats['pa_loss']):.4f}",
                        overlap=f"{float(stats['router_teacher_overlap']):.2f}")
    bar.close()
    model.requires_grad_(True)  # what SFT / RL expect of a loaded policy
    return losses


@torch.no_grad()
def compare(dense, model, examples: list[Example], pad_id: int, batch_size: int, device) -> dict:
    """The factor model against its dense teacher on `examples`, over the policy's tokens: both LM
    losses, greedy agreement (argmax equal, teacher-forced), and the routing numbers (L_PA unweighted,
    the share of the router's top-k that the PA teacher also picks)."""
    was = dense.training, model.training
    dense.eval()
    model.eval()
    sums = {"dense": 0.0, "factor": 0.0, "agree": 0.0, "pa": 0.0, "overlap": 0.0, "tokens": 0, "batches": 0}
    pa_coef = model.config.router_pa_coef
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, device)
        labels = batch["labels"][:, 1:]
        on = labels != IGNORE
        ref = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        with recording(model):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            _, stats = auxiliary_losses(model, batch["attention_mask"])
        tgt = labels.clamp(min=0)
        for name, logits in (("dense", ref), ("factor", out)):
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
            sums[name] += float(nll[on].sum())
        sums["agree"] += float((ref.argmax(-1) == out.argmax(-1))[on].sum())
        sums["tokens"] += int(on.sum())
        sums["pa"] += float(stats["pa_loss"]) / pa_coef
        sums["overlap"] += float(stats["router_teacher_overlap"])
        sums["batches"] += 1
    dense.train(was[0])
    model.train(was[1])
    n, b = max(sums["tokens"], 1), max(sums["batches"], 1)
    return {"dense_lm_loss": sums["dense"] / n, "factor_lm_loss": sums["factor"] / n,
            "greedy_agreement": sums["agree"] / n, "pa_loss": sums["pa"] / b,
            "router_teacher_overlap": sums["overlap"] / b, "tokens": sums["tokens"]}
