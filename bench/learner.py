"""RL update throughput: Turnstile's learner (algos/learner.py) vs TRL's `GRPOTrainer`, same model and batch.

Both frameworks train the same randomly initialised Llama (saved once to a temp folder, loaded by each)
on P prompts x G group members = P*G sequences per optimizer step, each a prompt of Lp random token ids
followed by a completion of exactly Lc random token ids, with a random 0/1 reward per sequence. One
optimizer step per batch, `--micro-batch` sequences per forward/backward (gradient accumulation for the
rest), AdamW, grad-clip 1.0, no KL term, one epoch. Nothing is generated: the completions are made
before the clock starts, so only the update is timed.

  * Turnstile: `Learner.update(trajectories)` (GRPO) on a DeepSpeed engine (gloo, one process, a torch
    AdamW: no native-op build). Timed: the whole `update` call = batch tensors + advantages +
    forward/backward of every micro-batch + the optimizer step. One epoch and one mini-batch make the
    update exactly on-policy, so the learner skips its no-grad pass for log pi_old (as TRL does).
  * TRL: `GRPOTrainer.train()` with a `rollout_func` that returns the pre-made completions. Timed: from
    the trainer's `on_step_begin` to its `on_step_end` (TRL's scoring: padding, rewards, group advantages;
    forward/backward of every micro-batch; grad clip; the optimizer step), minus the time spent inside
    `rollout_func` (a dictionary look-up). With one iteration per batch TRL skips the no-grad old-logprob
    pass too (the ratio is exactly 1 on-policy): both do the same FLOPs per token. GRPOConfig
    turns gradient checkpointing on by default: row "trl" turns it off (as Turnstile, the matched
    comparison and the one `speedup` divides by), row "trl-gc" keeps TRL's default.
  * Compiled rows: "turnstile-compiled" sets `runtime.compile: true` (torch.compile of the policy, on
    CPU with transformers' eager attention, and the fused AdamW); "trl-compiled" gives TRL the same
    (`torch_compile=True`, the model loaded with `attn_implementation="eager"`; TRL's default optimizer is
    the fused AdamW already).
    Their first (warm-up) update pays the compiling.

The first update of each run is a warm-up and is not counted. Each framework runs in its own child
process (TRL's accelerate and DeepSpeed's process group must not meet). FLOP counts and the matmul
peak are explained in docs/learner_bench.md.

    python bench/learner.py                          # both models, fp32 (~2.5 minutes on 2 idle cores)
    python bench/learner.py --precision amp_bf16     # bf16 autocast on both sides
    python bench/learner.py --precision bf16         # Turnstile: bf16 weights, fp32 master copies (TRL autocasts)
    python bench/learner.py --quick                  # small shapes, smoke check
    /path/to/venv-with-trl/bin/python bench/learner.py   # TRL rows need `pip install -e '.[peers]'`
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    # name: (hidden, layers, heads); MLP width is ModelConfig's default, 4 * hidden
    "llama-h512-L8": (512, 8, 8),  # the project's larger shape (countdown4): head_dim 64
    "tiny-h128-L4": (128, 4, 2),
}
RESULT = "LEARNER_BENCH_RESULT "
# name: (table label, forward-pass equivalents of compute per token per step)
FRAMEWORKS = {
    "turnstile": ("Turnstile Learner (DeepSpeed)", 3),  # fwd + bwd (2x); on-policy: no old-logprob pass
    "trl": ("TRL {trl}GRPOTrainer", 3),  # fwd + bwd; on-policy TRL reuses the fwd as the old log-probs
    "trl-gc": ("TRL {trl}GRPOTrainer, grad ckpt", 4),  # + the forward recomputed in the backward
    "turnstile-compiled": ("Turnstile Learner, runtime.compile", 3),
    "trl-compiled": ("TRL {trl}GRPOTrainer, torch_compile", 3),
}


# -- shared pieces --------------------------------------------------------------------------------

def make_tokenizer(folder: Path, vocab: int):
    """A byte-level BPE of exactly `vocab` tokens (TRL wants a real tokenizer; Turnstile only its pad id)."""
    import random

    from agents.tokenizer import TokenizerConfig, train_tokenizer

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]
    tok = train_tokenizer(corpus, TokenizerConfig(vocab_size=vocab, min_frequency=1))
    tok.save_pretrained(folder)
    return tok


def save_model(name: str, tok, folder: Path) -> int:
    import torch

    from agents.model import ModelConfig, build_model, count_parameters

    hidden, layers, heads = MODELS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, max_seq_len=1024),
                        len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    return count_parameters(model)


def make_batches(spec: dict) -> list[list[tuple[list[int], list[int], float]]]:
    """(prompt ids, completion ids, reward) for every sequence of every step; group g = rows g*G..g*G+G-1."""
    import random

    rng = random.Random(1234)
    lo = 3  # skip <pad> <bos> <eos>: no completion ends early, no padding anywhere
    steps = []
    for _ in range(spec["warmup"] + spec["steps"]):
        rows = []
        for _p in range(spec["prompts"]):
            prompt = [spec["bos"]] + [rng.randrange(lo, spec["vocab"]) for _ in range(spec["lp"] - 1)]
            for _g in range(spec["group"]):
                rows.append((prompt, [rng.randrange(lo, spec["vocab"]) for _ in range(spec["lc"])],
                             float(rng.random() < 0.5)))
        steps.append(rows)
    return steps


# -- children -------------------------------------------------------------------------------------

def turnstile_worker(spec: dict) -> dict:
    os.environ.setdefault("DS_BUILD_OPS", "0")
    import torch
    from transformers import AutoModelForCausalLM

    from algos.config import Experiment
    from algos.learner import Learner
    from rollout.trajectory import Trajectory

    torch.set_num_threads(spec["threads"])
    n_seq = spec["prompts"] * spec["group"]
    exp = Experiment.model_validate({
        "name": "learner_bench", "out_dir": spec["tmp"], "data_dir": spec["tmp"], "env": {"name": "bench"},
        "runtime": {"device": "cpu", "precision": spec["precision"], "threads": spec["threads"],
                    "compile": spec["framework"] == "turnstile-compiled"},
        "rl": {"algo": "grpo", "tasks_per_iter": spec["prompts"], "group_size": spec["group"], "epochs": 1,
               "minibatch_size": n_seq, "micro_batch_size": spec["micro"], "lr": spec["lr"], "grad_clip": 1.0,
               "kl_coef": 0.0, "entropy_coef": 0.0, "tis_cap": 0.0},
    })
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    learner = Learner(exp, policy, pad_token_id=spec["pad"])
    lp, lc = spec["lp"], spec["lc"]
    times, cpu, metrics = [], [], {}
    for step, rows in enumerate(make_batches(spec)):
        trajs = []
        for i, (prompt, completion, reward) in enumerate(rows):
            tr = Trajectory(task={"id": i // spec["group"]}, group=i // spec["group"])
            tr.append(prompt, policy=False)
            tr.append(completion, policy=True, logprobs=[0.0] * lc)
            tr.add_turn_reward(reward)
            trajs.append(tr)
        assert all(len(t.token_ids) == lp + lc for t in trajs)
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = learner.update(trajs, seed=step)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"step_s": times[spec["warmup"]:], "warmup_s": times[:spec["warmup"]], "cpu_s": cpu[spec["warmup"]:],
            "train_tokens": metrics.get("train_tokens"), "policy_loss": metrics.get("policy_loss"),
            "compiled": learner.policy._compiled_call_impl is not None}


def trl_worker(spec: dict) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(spec["threads"])
    g, n_seq = spec["group"], spec["prompts"] * spec["group"]
    batches = make_batches(spec)
    # prompt text "p<k>" -> the k-th prompt's ids and its G completions (consumed in order)
    table: dict[str, list] = {}
    for s, rows in enumerate(batches):
        for p in range(spec["prompts"]):
            group = rows[p * g:(p + 1) * g]
            table[f"p{s}_{p}"] = [group[0][0], [c for _, c, _ in group], [r for _, _, r in group]]
    rollout_s, calls = [0.0], []
    rewards_of: dict[tuple, float] = {}

    def rollout_func(prompts: list[str], trainer) -> dict:
        t0 = time.perf_counter()
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        seen: dict[str, int] = {}
        calls.append(len(prompts))
        for text in prompts:  # each prompt arrives G times (TRL's repeat sampler)
            k = seen.get(text, 0)
            seen[text] = k + 1
            prompt, comps, rewards = table[text]
            out["prompt_ids"].append(prompt)
            out["completion_ids"].append(comps[k])
            out["logprobs"].append([0.0] * len(comps[k]))
            rewards_of[tuple(comps[k])] = rewards[k]
        rollout_s[0] += time.perf_counter() - t0
        return out

    def reward_func(prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [rewards_of[tuple(ids)] for ids in completion_ids]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.c0, self.rollout0, self.times, self.cpu = 0.0, 0.0, 0.0, [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0, self.rollout0 = time.perf_counter(), time.process_time(), rollout_s[0]

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0 - (rollout_s[0] - self.rollout0))
            self.cpu.append(time.process_time() - self.c0)

    tok = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer"])
    compiled = spec["framework"] == "trl-compiled"
    # the compiled row gets what runtime.compile gives Turnstile: eager attention for inductor to fuse
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                 attn_implementation="eager" if compiled else None)
    n_steps = spec["warmup"] + spec["steps"]
    data = Dataset.from_dict({"prompt": [f"p{s}_{p}" for s in range(n_steps) for p in range(spec["prompts"])]})
    config = GRPOConfig(
        output_dir=str(Path(spec["tmp"]) / "trl"), use_cpu=True, seed=0,
        per_device_train_batch_size=spec["micro"], gradient_accumulation_steps=n_seq // spec["micro"],
        num_generations=g, max_completion_length=spec["lc"], max_steps=n_steps, num_iterations=1,
        shuffle_dataset=False, learning_rate=spec["lr"], adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
        # TRL's only bf16 mode is autocast (bf16=True); it has no bf16 weights with fp32 master copies
        bf16="bf16" in spec["precision"], fp16=False,
        torch_compile=compiled,  # (TRL's default optimizer is torch's fused AdamW already)
        # GRPOConfig turns gradient checkpointing on by default (recomputes each forward in the backward);
        # "trl" matches Turnstile (off), "trl-gc" keeps TRL's default
        gradient_checkpointing=spec["framework"] == "trl-gc",
        save_strategy="no", eval_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward_func, args=config, train_dataset=data,
                          processing_class=tok, rollout_func=rollout_func, callbacks=[timer])
    assert trainer.args.generation_batch_size == n_seq, trainer.args.generation_batch_size
    trainer.train()
    times = timer.times
    return {"step_s": times[spec["warmup"]:], "warmup_s": times[:spec["warmup"]], "cpu_s": timer.cpu[spec["warmup"]:],
            "rollout_s": rollout_s[0],
            "rollout_calls": calls, "loss_type": config.loss_type,
            "mixed_precision": str(trainer.accelerator.mixed_precision),
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False))}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    fn = turnstile_worker if spec["framework"].startswith("turnstile") else trl_worker
    print(RESULT + json.dumps(fn(spec)), flush=True)


def run_child(spec: dict, tmp: Path) -> dict | str:
    path = tmp / f"spec_{spec['framework']}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, DS_BUILD_OPS="0", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True,
                              text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return "failed: timed out"
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line.removeprefix(RESULT))
    tail = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()][-3:] or ["?"]
    return "failed: " + " / ".join(t.strip()[:160] for t in tail)


# -- FLOPs and the matmul peak ----------------------------------------------------------------------

def fwd_flops_per_token(n_params: int, layers: int, hidden: int, seq: int) -> float:
    """2N for the weight matmuls + causal attention (QK^T and AV: 2 * 2 * d * seq/2 per layer)."""
    return 2.0 * n_params + 2.0 * layers * hidden * seq


def matmul_peak(dtype_name: str, n: int, seconds: float) -> float:
    """GFLOP/s of a square `torch.matmul` loop (best of a few timed bursts)."""
    import torch

    from algos.runtime import DTYPES

    dtype = DTYPES[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t, reps = time.perf_counter(), 3
        for _ in range(reps):
            torch.matmul(a, b)
        best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - t) / 1e9)
    return best


# -- main -------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2x4 sequences of 16+32 tokens, 1 timed step")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--precision", choices=["fp32", "amp_bf16", "bf16"], default="fp32",
                    help="amp_bf16: fp32 weights, bf16 autocast (Turnstile runtime.precision; TRL bf16=True); "
                         "bf16: Turnstile with bf16 weights and fp32 master copies (DeepSpeed), TRL autocast")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--prompts", type=int, default=4, help="P: prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G: sequences per prompt")
    ap.add_argument("--prompt-len", type=int, default=64, help="Lp")
    ap.add_argument("--completion-len", type=int, default=128, help="Lc")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tiny-steps", type=int, default=5, help="timed steps for the tiny model")
    ap.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS),
                    help="trl: TRL with gradient checkpointing off (as Turnstile); trl-gc: TRL's default (on); "
                         "*-compiled: torch.compile on either side")
    ap.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak matmul loop")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child)
    if args.quick:
        args.prompts, args.group, args.prompt_len, args.completion_len = 2, 4, 16, 32
        args.micro_batch, args.steps, args.tiny_steps, args.peak_n = 4, 1, 1, 1024
    n_seq = args.prompts * args.group
    if n_seq % args.micro_batch:
        ap.error(f"--micro-batch {args.micro_batch} must divide P*G = {n_seq}")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    has_trl = importlib.util.find_spec("trl") is not None
    trl_version = None
    if has_trl:
        from importlib.metadata import version

        trl_version = version("trl")
    peak = {p: matmul_peak(p, args.peak_n, 1.0 if args.quick else 3.0) for p in ("fp32", "bf16")}
    peak_key = "bf16" if "bf16" in args.precision else "fp32"
    print(f"matmul peak ({args.peak_n}x{args.peak_n}, {args.threads} threads): fp32 {peak['fp32']:.1f} GFLOP/s, "
          f"bf16 {peak['bf16']:.1f} GFLOP/s", flush=True)

    seq = args.prompt_len + args.completion_len
    tokens = n_seq * seq
    rows = []
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        tok = make_tokenizer(tmp / "tok", 512)
        for name in args.models:
            folder = tmp / name
            n_params = save_model(name, tok, folder)
            hidden, layers, _ = MODELS[name]
            f_tok = fwd_flops_per_token(n_params, layers, hidden, seq)
            spec = {"model": str(folder), "tokenizer": str(tmp / "tok"), "tmp": str(tmp), "threads": args.threads,
                    "precision": args.precision, "prompts": args.prompts, "group": args.group,
                    "lp": args.prompt_len, "lc": args.completion_len, "micro": args.micro_batch, "lr": 1e-5,
                    "warmup": args.warmup, "steps": args.tiny_steps if name.startswith("tiny") else args.steps,
                    "vocab": len(tok), "pad": tok.pad_token_id, "bos": tok.bos_token_id}
            results = {}
            for fw in args.frameworks:
                if fw.startswith("trl") and not has_trl:
                    results[fw] = "TRL not installed (pip install -e '.[peers]')"
                    continue
                t0 = time.perf_counter()
                results[fw] = run_child(dict(spec, framework=fw), tmp)
                print(f"  {name} {fw}: {time.perf_counter() - t0:.0f} s wall", flush=True)
            for fw in args.frameworks:
                res = results[fw]
                passes = FRAMEWORKS[fw][1]
                row = {"model": name, "params": n_params, "framework": fw, "seqs": n_seq, "tokens": tokens}
                if isinstance(res, str):
                    row["note"] = res
                else:
                    best = min(range(len(res["step_s"])), key=res["step_s"].__getitem__)
                    s = res["step_s"][best]  # the fastest timed step: robust to other processes' bursts
                    # CPU seconds per wall second of that step: ≈ threads when the cores were ours
                    res["cpu_per_wall"] = res["cpu_s"][best] / s
                    gflops = passes * f_tok * tokens / s / 1e9
                    row.update(s_step=s, tps=tokens / s, gflops=gflops, pct=100 * gflops / peak[peak_key],
                               detail=res)
                rows.append(row)
            tps = {r["framework"]: r.get("tps") for r in rows if r["model"] == name}
            for r in rows:
                if r["model"] == name and r.get("tps") and tps.get("trl"):
                    r["speedup"] = r["tps"] / tps["trl"]

    # a second, shorter peak measurement: a drop means other processes took the cores during the run
    peak_after = {p: matmul_peak(p, args.peak_n, 1.0) for p in ("fp32", "bf16")}
    labels = {fw: label.format(trl=f"{trl_version} " if trl_version else "") for fw, (label, _) in FRAMEWORKS.items()}
    from rollout.machine import machine_name

    print(f"\nmachine: {machine_name()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl_version or 'not installed'}"
          f", {args.threads} threads, {time.strftime('%Y-%m-%d', time.gmtime())}; precision {args.precision}; "
          f"P x G = {args.prompts} x {args.group}, Lp {args.prompt_len}, Lc {args.completion_len}, "
          f"micro-batch {args.micro_batch}; s/step = fastest of the timed steps after {args.warmup} warm-up")
    print(f"peak = {peak_key} matmul {peak[peak_key]:.1f} GFLOP/s; GFLOP/s counts the forward FLOPs per token x 3 "
          "for Turnstile and TRL (fwd+bwd; on-policy, neither runs an old-logprob pass), x 4 "
          "for TRL-gc (+ the forward recomputed by gradient checkpointing); speedup = tokens/s / TRL's (no gc)")
    header = (f"| {'model':<14} | {'params':>7} | {'framework':<33} | {'seqs/step':>9} | {'tokens/step':>11} "
              f"| {'s/step':>7} | {'tokens/s':>8} | {'GFLOP/s':>7} | {'% of peak':>9} | {'speedup vs TRL':>14} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        if "note" in r:
            print(f"| {r['model']:<14} | {r['params'] / 1e6:>6.1f}M | {labels[r['framework']]:<33} | "
                  f"{r['seqs']:>9} | {r['tokens']:>11} | {r['note']}")
            continue
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        print(f"| {r['model']:<14} | {r['params'] / 1e6:>6.1f}M | {labels[r['framework']]:<33} | {r['seqs']:>9} | "
              f"{r['tokens']:>11} | {r['s_step']:>7.2f} | {r['tps']:>8.0f} | {r['gflops']:>7.1f} | "
              f"{r['pct']:>8.1f}% | {sp:>14} |")
    print(f"\nper run: timed steps (s); CPU-s per wall-s of the fastest step (≈{args.threads} when the cores were "
          "ours)")
    for r in rows:
        if "detail" in r:
            d = r["detail"]
            print(f"  {r['model']:<14} {r['framework']:<9} steps {[round(x, 2) for x in d['step_s']]} "
                  f"(mean {sum(d['step_s']) / len(d['step_s']):.2f}) warm-up {[round(x, 2) for x in d['warmup_s']]} "
                  f"cpu/wall {d['cpu_per_wall']:.2f}")
    print(f"matmul peak before/after the runs: fp32 {peak['fp32']:.0f}/{peak_after['fp32']:.0f}, "
          f"bf16 {peak['bf16']:.0f}/{peak_after['bf16']:.0f} GFLOP/s")
    busy = [r for r in rows if "detail" in r and r["detail"]["cpu_per_wall"] < 0.85 * args.threads]
    if busy or min(peak_after[k] / peak[k] for k in peak) < 0.85:
        print("WARNING: the machine looks busy (other processes took CPU): the numbers above are not clean")
    if args.json:
        out = {"peak_gflops": peak, "peak_after_gflops": peak_after, "args": vars(args), "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
