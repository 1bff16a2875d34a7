"""One whole multi-turn GRPO iteration, Turnstile vs TRL's `GRPOTrainer`, side by side in one run.

The iteration is the main job's (configs/countdown3_grpo.yaml): `--tasks` train tasks of multi-turn
Countdown (`countdown_search`: one line per turn, the env answers with the new node; dense turn
rewards) x `--group` episodes each (default 16 x 8 = 128 episodes), sampled at temperature 1, then
one GRPO optimizer step on all of them, fp32, on CPU. Both sides play the same policy (a
LlamaForCausalLM + tokenizer from `--policy`, loaded by each side with `from_pretrained`), the same
tasks, the same env, the same text format (envs/countdown/format.py: the prompt, where a turn stops
— any token holding a newline, or <eos> —, the action handed to `env.step`, the observation tokens
appended after it), the same budgets (`rollout.max_turn_tokens` new tokens per turn, `env.max_turns`
turns, `model.max_seq_len` tokens per conversation) and the same reward (the env's: an episode's
return, the sum of its turn rewards). The update is the same shape: 128 episodes in micro-batches
of 16 (gradient accumulation), one AdamW step (lr, betas, weight decay, grad clip from the recipe),
no KL term, one epoch, gradient checkpointing off on both sides.

  * Turnstile: exactly the RL loop's iteration (algos/rl.py): `RolloutPool.play` (Ray rollout
    workers, each a `TorchEngine` with sessions: each episode keeps its KV cache between turns, so a
    turn prefills only the new observation; all live episodes of a worker decode in one batch; env
    calls in a thread pool under a time limit), `learner.update` (DeepSpeed over gloo, ZeRO 0, in
    the driver for one rank, `LearnerGroup` Ray actors for `learner.num_ranks` 2; on-policy, so no
    old-log-prob pass) and the weight sync (`learner.policy_state_dict()` + `pool.update_weights`:
    one object-store put, every worker loads it). Phases: generation = the engine calls
    (`generate_s`), env = resets, steps, decoding the turn and tokenising the reply (`env_s`), both
    the slowest worker's; update = the `learner.update` call from the driver; sync = gather + push;
    other = the rest of the iteration (Ray dispatch, shipping trajectories back, bookkeeping; 0 when
    two workers' slowest generation and slowest env phase overlap).
  * TRL: `GRPOTrainer.train()` with a `rollout_func` (the multi-turn hook for custom rollouts; the
    other one, `environment_factory`, exposes an env's methods as chat *tool calls*: it needs a
    chat template that can render tool calls and a model that writes tool-call JSON, which a policy
    writing search lines in a 370-token vocabulary is not). The rollout_func plays the episodes
    turn by turn the way TRL's own tool-calling loop does (`GRPOTrainer._tool_call_loop`): each turn
    calls `trainer._generate_single_turn` — TRL's regular generation path, `unwrap_model_for_
    generation` + transformers `model.generate` (sampling, temperature 1, a DynamicCache *within*
    the call) on the training model itself — on every live episode's whole conversation so far,
    left-padded into one batch: no KV is kept between turns, each turn prefills the conversation
    again. The stop tokens are given to TRL the standard way (the model's generation_config
    `eos_token_id`, which TRL reads at init), the per-turn budget by `GRPOConfig.generation_kwargs`.
    It returns prompt ids, the completion ids (all turns, env tokens included) with an `env_mask`
    that keeps the env's tokens out of the loss, and the episode return, which the reward function
    passes on. Phases: generation = time inside `_generate_single_turn`; env = resets, steps,
    decoding and tokenising (the same work as Turnstile's env phase); update = the trainer step
    (`on_step_begin` to `on_step_end`) minus the rollout_func: TRL's scoring (padding, rewards,
    group advantages) + forward/backward of each micro-batch + clip + optimizer step; sync = 0
    (generation runs on the training weights); other = the rest of rollout_func. loss_type "grpo"
    (per-episode mean, as Turnstile's `rl.loss_aggregation: episode`), scale_rewards "group" (as
    `rl.std_normalize`), beta 0, num_iterations 1, so TRL skips its old-log-prob pass too.

Known differences that stay: the two sides sample different tokens (different RNG streams), so
their episodes differ in length: compare tokens/s as well as s/iteration. TRL has no importance
weights without vLLM (Turnstile's truncated IS weights cost no forward). TRL pads the whole
generation batch once (every micro-batch to the longest of the 128); Turnstile pads each
micro-batch to its own longest. TRL's optimizer is torch's AdamW as `optim="adamw_torch"` gives it.

CPU s is the CPU time every process of the row used in that iteration (the driver with its env
threads, the rollout workers, the learner ranks; not Ray's own daemons): on a machine shared with
other jobs it moves much less than wall seconds, so the CPU-second ratios are the steadier ones.

Each row runs in its own child process (TRL's accelerate and DeepSpeed's process group must not
meet; every Turnstile row starts its own Ray cluster). Each side plays and updates once as a
warm-up, then `--rounds` iterations are timed; a row's numbers are its fastest timed iteration
(the machine is shared: the fastest is the best estimate of the uncontended speed), and every
round's seconds are printed under the table. Measured figures and what limits each side: docs/learner_bench.md.

    python bench/iteration.py                                  # trained policy if present (est. ~15 min, idle cores)
    python bench/iteration.py --threads 1 --rounds 1           # a loaded machine: 1 thread per process
    python bench/iteration.py --policy runs/countdown3_search_sft --rounds 3 --out iteration.json
    python bench/iteration.py --rows turnstile trl             # just the head-to-head
    python bench/iteration.py --quick                          # tiny smoke run (a fresh policy, 2 x 2 episodes)

The TRL row needs `pip install -e '.[peers]'` (trl>=1.0); without it the row says so.
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

RESULT = "ITERATION_BENCH_RESULT "
ROUND = "ITERATION_BENCH_ROUND "  # a child's finished iteration, shown as progress
# name: (label, rollout workers, learner ranks, framework)
ROWS = {
    "turnstile": ("Turnstile", 1, 1, "turnstile"),
    "turnstile-2w": ("Turnstile, 2 rollout workers", 2, 1, "turnstile"),
    "turnstile-2r": ("Turnstile, 2 learner ranks", 1, 2, "turnstile"),
    "trl": ("TRL {trl}GRPOTrainer + rollout_func", 1, 1, "trl"),
    "trl-gc": ("TRL {trl}GRPOTrainer, grad ckpt (its default)", 1, 1, "trl"),
}
TRAINED = ("runs/countdown3_search_sft", "runs/countdown3_sos", "runs/dense_sft_800")  # first found is the default
PHASES = ("generate_s", "env_s", "update_s", "sync_s", "other_s")


# -- shared pieces --------------------------------------------------------------------------------

def experiment(spec: dict, workers: int = 1, ranks: int = 1):
    """The recipe with the bench's settings: fp32 on CPU, one on-policy step on all the episodes."""
    from algos.config import load_config

    n, t = spec["tasks"] * spec["group"], spec["threads"]
    over = [f"out_dir={spec['tmp']}/run", f"data_dir={spec['tmp']}/data", "runtime.device=cpu",
            "runtime.precision=fp32", f"runtime.threads={t}", "runtime.zero_stage=0",
            f"rl.tasks_per_iter={spec['tasks']}", f"rl.group_size={spec['group']}", "rl.epochs=1",
            f"rl.minibatch_size={n}", f"rl.micro_batch_size={min(spec['micro'], n)}", "rl.kl_coef=0.0",
            f"rollout.num_workers={workers}", "rollout.cpus_per_worker=1",
            f"rollout.threads_per_worker={max(1, t // workers)}", "rollout.dtype=float32", "rollout.temperature=1.0",
            "rollout.mode=sync", f"+learner.num_ranks={ranks}", "+learner.cpus_per_rank=1",
            f"+learner.threads_per_rank={max(1, t // ranks)}",
            f"ray.num_cpus={max(2, workers + (ranks if ranks > 1 else 0))}"]
    if spec.get("max_turns"):
        over.append(f"env.max_turns={spec['max_turns']}")
    if spec.get("episode_tokens"):
        over.append(f"rollout.max_episode_tokens={spec['episode_tokens']}")
    return load_config(spec["recipe"], over)


def bench_tasks(exp, n: int) -> list[dict]:
    """The train tasks of the RL loop's first iteration (algos/rl.py's draw); every round plays them."""
    import random

    import envs
    from rollout.runner import episode_seed

    source = envs.make_tasks(exp.env.name, **exp.env_options())
    return source.sample_tasks("train", n, random.Random(episode_seed(exp.seed, "tasks", 0)),
                               skip=exp.sft.demos.num_examples if exp.rl.skip_sft_tasks and exp.sft else 0)


def play_seed(exp, round_: int) -> int:
    from rollout.runner import episode_seed

    return episode_seed(exp.seed, "play", round_)


def fresh_policy(recipe: str, folder: Path, demos: int = 200) -> Path:
    """An untrained policy of the recipe's shape, with a tokenizer trained on the env's demonstrations."""
    import torch

    import envs
    from agents.model import build_model
    from agents.tokenizer import train_tokenizer
    from algos.config import load_config

    exp = load_config(recipe, [f"out_dir={folder}/run"])
    source = envs.make_tasks(exp.env.name, **exp.env_options())
    options = exp.sft.demos.options() if exp.sft else {}
    fmt = envs.format_for(exp.env.name)
    texts = ["".join(text for text, _ in fmt.segments(d))
             for d in envs.demonstrations(exp.env.name, source, "train", demos, exp.seed, **options)]
    tok = train_tokenizer(texts, exp.tokenizer)
    torch.manual_seed(exp.seed)
    model = build_model(exp.model, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (all their threads), from /proc."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


# -- children -------------------------------------------------------------------------------------

def turnstile_child(spec: dict) -> dict:
    """The RL loop's iteration (algos/rl.py), phase by phase, warm-up + timed rounds."""
    import ray

    from algos.evaluate import summarize
    from algos.ranks import make_learner
    from algos.runtime import apply_threads, seed_everything
    from rollout.runner import episode_seed
    from rollout.worker import RolloutPool, WorkerSpec

    exp = experiment(spec, spec["workers"], spec["ranks"])
    seed_everything(exp.seed)
    apply_threads(exp.runtime)
    tasks = bench_tasks(exp, spec["tasks"])
    learner, _ = make_learner(exp, spec["policy"])
    pool = RolloutPool(WorkerSpec(policy_folder=spec["policy"], env_name=exp.env.name, env_options=exp.env_options(),
                                  max_episode_tokens=exp.model.max_seq_len, precision=exp.runtime.precision),
                        exp.rollout, exp.ray)
    # every process of the row: the driver (and its env threads), the workers, the learner ranks
    pids = [os.getpid()] + ([] if pool.local else ray.get([a.ping.remote() for a in pool.actors]))
    pids += learner.pids() if hasattr(learner, "pids") else []
    rounds = []
    try:
        for r in range(1 + spec["rounds"]):  # round 0 is the warm-up
            c0 = cpu_seconds(pids)
            t0 = time.perf_counter()
            trajs, stats = pool.play(tasks, spec["group"], seed=play_seed(exp, r))
            t1 = time.perf_counter()
            summary = summarize(trajs, stats)
            metrics = learner.update(trajs, seed=episode_seed(exp.seed, r))
            t2 = time.perf_counter()
            pool.update_weights(learner.policy_state_dict(), version=r + 1)
            t3 = time.perf_counter()
            row = {"iteration_s": t3 - t0, "collect_s": t1 - t0, "generate_s": stats["generate_s"],
                   "env_s": stats["env_s"], "update_s": t2 - t1, "sync_s": t3 - t2,
                   "learner_update_s": metrics.get("update_s"), "episodes": len(trajs),
                   "policy_tokens": int(stats["policy_tokens"]), "turns": int(stats["turns"]),
                   "episode_tokens": summary["episode_tokens"], "mean_return": summary["mean_return"],
                   "accuracy": summary["accuracy"], "truncated": summary["truncated"],
                   "infra_errors": summary["infra_errors"], "old_pass": metrics.get("old_pass"),
                   "train_tokens": metrics.get("train_tokens"), "loadavg": os.getloadavg()[0],
                   "cpu_s": cpu_seconds(pids) - c0, "processes": len(pids)}
            # with several workers, generation and env are each the slowest worker's: they may overlap
            row["other_s"] = max(0.0, row["iteration_s"] - sum(row[k] for k in PHASES[:-1]))
            rounds.append(row)
            print(ROUND + json.dumps(row), flush=True)
    finally:
        pool.shutdown()
        learner.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    return {"warmup": rounds[0], "rounds": rounds[1:]}


def trl_child(spec: dict) -> dict:
    """GRPOTrainer.train() for 1 + rounds steps, the episodes played by a multi-turn rollout_func."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import envs
    from rollout.runner import episode_seed

    torch.set_num_threads(spec["threads"])
    exp = experiment(spec)
    cfg, rl = exp.rollout, exp.rl
    tasks = bench_tasks(exp, spec["tasks"])
    g, n = spec["group"], spec["tasks"] * spec["group"]
    micro = min(spec["micro"], n)
    budget = min(cfg.max_episode_tokens or exp.model.max_seq_len, exp.model.max_seq_len)
    env_cfg = envs.validate_config(exp.env.name, exp.env_options())
    fmt = envs.format_for(exp.env.name)

    tok = AutoTokenizer.from_pretrained(spec["policy"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    # The turn ends at any token holding a stop text (as rollout/runner.py's EpisodeRunner) or <eos>;
    # TRL reads its stop ids from the model's generation config.
    vocab = sorted(tok.get_vocab().values())
    pieces = tok.batch_decode([[i] for i in vocab])
    stops = sorted({i for t in fmt.stop_texts for i, p in zip(vocab, pieces) if t in p})
    model.generation_config.eos_token_id = [tok.eos_token_id, *stops]
    stop_set = set(model.generation_config.eos_token_id)
    environments = [envs.make(exp.env.name, env_cfg) for _ in range(n)]
    clock = {"generate_s": 0.0, "env_s": 0.0, "rollout_s": 0.0}
    played: list[dict] = []

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    def rollout_func(prompts: list[str], trainer) -> dict:
        t_start = time.perf_counter()
        step = trainer.state.global_step
        seed = play_seed(exp, step)
        seen: dict[str, int] = {}
        eps = []
        t0 = time.perf_counter()
        for i, text in enumerate(prompts):  # "task<k>": TRL's sampler hands each prompt G times
            k = int(text.removeprefix("task"))
            m = seen.get(text, 0)
            seen[text] = m + 1
            env = environments[i]
            obs, _info = env.reset(seed=episode_seed(seed, k * g + m), options={"task": tasks[k]})
            prompt = [tok.bos_token_id] + encode(fmt.prompt(obs))
            eps.append({"env": env, "prompt": prompt, "ids": list(prompt), "mask": [], "ret": 0.0, "obs": obs,
                        "turns": 0, "policy": 0})
        clock["env_s"] += time.perf_counter() - t0
        live = list(range(len(eps)))
        while live:
            live = [i for i in live if len(eps[i]["ids"]) < budget]
            if not live:
                break
            t0 = time.perf_counter()
            outs, _ = trainer._generate_single_turn([eps[i]["ids"] for i in live], None, {}, num_generations=1)
            clock["generate_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            still = []
            for i, ids in zip(live, outs):  # as rollout/runner.py's _step_envs
                ep = eps[i]
                turn = ids[:next((j + 1 for j, t in enumerate(ids) if t in stop_set), len(ids))]
                kept = turn[:budget - len(ep["ids"])]
                ep["ids"] += kept
                ep["mask"] += [1] * len(kept)
                ep["turns"] += 1
                ep["policy"] += len(kept)
                if len(kept) < len(turn):  # cut by the episode budget: no action is taken
                    continue
                text = tok.decode(kept, skip_special_tokens=True)
                action = fmt.action(ep["obs"], text)
                obs, reward, terminated, truncated, _info = ep["env"].step(action)
                ep["ret"] += reward
                if terminated or truncated:
                    continue
                reply = encode(fmt.observation(obs, action, text))
                ep["ids"] += reply
                ep["mask"] += [0] * len(reply)
                ep["obs"] = obs
                still.append(i)
            live = still
            clock["env_s"] += time.perf_counter() - t0
        played.append({"step": step, "episodes": len(eps), "policy_tokens": sum(e["policy"] for e in eps),
                       "turns": sum(e["turns"] for e in eps),
                       "episode_tokens": sum(len(e["ids"]) for e in eps) / len(eps),
                       "mean_return": sum(e["ret"] for e in eps) / len(eps)})
        clock["rollout_s"] += time.perf_counter() - t_start
        return {"prompt_ids": [e["prompt"] for e in eps],
                "completion_ids": [e["ids"][len(e["prompt"]):] for e in eps],
                "logprobs": None, "env_mask": [e["mask"] for e in eps],
                "episode_return": [e["ret"] for e in eps]}

    def env_reward(prompts, completions, episode_return, **kwargs) -> list[float]:
        return list(episode_return)

    rounds: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0, self.cpu0 = time.perf_counter(), dict(clock), cpu_seconds([os.getpid()])

        def on_step_end(self, args, state, control, **kwargs):
            dt = time.perf_counter() - self.t0
            d = {k: clock[k] - self.c0[k] for k in clock}
            row = {"iteration_s": dt, "generate_s": d["generate_s"], "env_s": d["env_s"],
                   "update_s": dt - d["rollout_s"], "sync_s": 0.0,
                   "other_s": d["rollout_s"] - d["generate_s"] - d["env_s"], "loadavg": os.getloadavg()[0],
                   "cpu_s": cpu_seconds([os.getpid()]) - self.cpu0, "processes": 1}
            row.update({k: v for k, v in played[-1].items() if k != "step"})
            rounds.append(row)
            print(ROUND + json.dumps(row), flush=True)

    steps = 1 + spec["rounds"]
    data = Dataset.from_dict({"prompt": [f"task{k}" for _ in range(steps) for k in range(len(tasks))]})
    config = GRPOConfig(
        output_dir=str(Path(spec["tmp"]) / "trl"), use_cpu=True, seed=exp.seed, bf16=False, fp16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro, num_generations=g,
        max_completion_length=budget, generation_kwargs={"max_new_tokens": cfg.max_turn_tokens},
        temperature=cfg.temperature, top_p=1.0, top_k=0, max_steps=steps, num_iterations=1,
        shuffle_dataset=False, learning_rate=rl.lr, adam_beta1=rl.betas[0], adam_beta2=rl.betas[1],
        weight_decay=rl.weight_decay, max_grad_norm=rl.grad_clip, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", beta=0.0, loss_type="grpo", scale_rewards="group" if rl.std_normalize else "none",
        gradient_checkpointing=spec["row"] == "trl-gc", save_strategy="no", eval_strategy="no", report_to=[],
        logging_steps=10**6, disable_tqdm=True, log_completions=False, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=env_reward, args=config, train_dataset=data,
                          processing_class=tok, rollout_func=rollout_func, callbacks=[StepTimer()])
    assert trainer.args.generation_batch_size == n, trainer.args.generation_batch_size
    trainer.train()
    assert len(rounds) == steps and all(r["episodes"] == n for r in rounds), rounds
    return {"warmup": rounds[0], "rounds": rounds[1:], "loss_type": config.loss_type,
            "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
            "stop_ids": len(stops)}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    fn = trl_child if ROWS[spec["row"]][3] == "trl" else turnstile_child
    print(RESULT + json.dumps(fn(spec)), flush=True)


def run_child(spec: dict, tmp: Path, timeout: float) -> dict | str:
    path = tmp / f"spec_{spec['row']}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, DS_BUILD_OPS="0", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled",
               OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    # a Ray cluster of our own: with no address, ray.init joins any local cluster another process started
    env.setdefault("RAY_ADDRESS", "local")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    import threading

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(path)], env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=ROOT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        result, lines = None, []
        try:
            for line in proc.stdout:  # the child's rounds as they finish, then its result
                if line.startswith(ROUND):
                    r = json.loads(line.removeprefix(ROUND))
                    print(f"    {spec['row']}: iteration {r['iteration_s']:.1f} s (generation {r['generate_s']:.1f}, "
                          f"update {r['update_s']:.1f}; {r['cpu_s']:.1f} CPU s), load average {r['loadavg']:.2f}",
                          flush=True)
                elif line.startswith(RESULT):
                    result = json.loads(line.removeprefix(RESULT))
                else:
                    lines.append(line)
            proc.wait()
        finally:
            timed_out = not timer.is_alive() and proc.returncode != 0
            timer.cancel()
        if result is not None:
            return result
        if timed_out:
            return f"failed: timed out after {timeout:.0f} s"
        err.seek(0)
        tail = [ln for ln in (err.read() + "".join(lines)).strip().splitlines() if ln.strip()][-3:] or ["?"]
    return "failed: " + " / ".join(t.strip()[:200] for t in tail)


# -- main -------------------------------------------------------------------------------------------

def best(res: dict) -> dict:
    return min(res["rounds"], key=lambda r: r["iteration_s"])


def main() -> None:
    from rollout.machine import machine_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/countdown3_grpo.yaml")
    ap.add_argument("--policy", help="run / checkpoint / save_pretrained folder; default: the first of "
                    f"{', '.join(TRAINED)} that exists, else a fresh (untrained) policy of the recipe's shape")
    ap.add_argument("--rows", nargs="+", default=["turnstile", "trl", "turnstile-2w", "turnstile-2r"],
                    choices=list(ROWS))
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--group", type=int, default=8, help="episodes per task")
    ap.add_argument("--rounds", type=int, default=2, help="timed iterations per row (after one warm-up)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="cores each row may use")
    ap.add_argument("--micro-batch", type=int, default=16, help="episodes per forward/backward (both sides)")
    ap.add_argument("--max-turns", type=int, help="override env.max_turns")
    ap.add_argument("--episode-tokens", type=int, help="override rollout.max_episode_tokens")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    ap.add_argument("--quick", action="store_true", help="smoke run: a fresh policy, 2 tasks x 2 episodes, 3 turns, "
                    "1 round")
    ap.add_argument("--out", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_main(args.child)
    if args.quick:
        args.tasks, args.group, args.rounds = 2, 2, 1
        args.max_turns, args.episode_tokens = args.max_turns or 3, args.episode_tokens or 192

    has_trl = importlib.util.find_spec("trl") is not None
    trl_version = None
    if has_trl:
        from importlib.metadata import version

        trl_version = version("trl")
    import torch
    import transformers

    from algos.checkpoint import policy_folder

    load_before = os.getloadavg()
    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        policy = args.policy or (None if args.quick else next((p for p in TRAINED if (ROOT / p).exists()), None))
        if policy is None:
            folder, policy_name = fresh_policy(args.recipe, tmp / "policy"), "fresh (untrained) policy"
        else:
            folder, policy_name = policy_folder(ROOT / policy if not Path(policy).is_absolute() else policy), policy
        spec = {"recipe": str(ROOT / args.recipe if not Path(args.recipe).is_absolute() else args.recipe),
                "policy": str(folder), "tmp": str(tmp), "tasks": args.tasks, "group": args.group,
                "rounds": args.rounds, "threads": args.threads, "micro": args.micro_batch,
                "max_turns": args.max_turns, "episode_tokens": args.episode_tokens}
        for row in args.rows:
            _, workers, ranks, framework = ROWS[row]
            if framework == "trl" and not has_trl:
                results[row] = "TRL not installed (pip install -e '.[peers]')"
                continue
            t0 = time.perf_counter()
            results[row] = run_child(dict(spec, row=row, workers=workers, ranks=ranks), tmp, args.timeout)
            print(f"  {row}: {time.perf_counter() - t0:.0f} s wall, load average {os.getloadavg()[0]:.2f}", flush=True)
    load_after = os.getloadavg()

    ok = {k: v for k, v in results.items() if isinstance(v, dict)}
    base = ok.get("turnstile")
    trl = ok.get("trl")
    labels = {k: v[0].format(trl=f"{trl_version} " if trl_version else "") for k, v in ROWS.items()}
    print(f"\n{args.recipe}, policy {policy_name}: {args.tasks} tasks x {args.group} episodes per iteration, one "
          f"GRPO step, fp32, {args.threads} threads per row; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, TRL {trl_version or 'not installed'}, "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    print(f"machine: {machine_name()}; load average (1 min) {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (5 min: {load_before[1]:.2f} / {load_after[1]:.2f})")
    print("seconds = the fastest of the timed iterations after 1 warm-up, split into its phases; CPU s = the CPU "
          "seconds all the row's processes used in it (driver, rollout workers, learner ranks; not Ray's daemons); "
          "policy tok/s = the policy's tokens that iteration / its seconds\n")
    cols = ("run", "workers", "ranks", "s/iter", "generation", "env", "update", "sync", "other", "CPU s",
            "policy tokens", "policy tok/s", "vs TRL")
    widths = (44, 7, 5, 7, 10, 6, 6, 6, 6, 7, 13, 12, 7)
    print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    rows_out = []
    for row in args.rows:
        res = results[row]
        _, workers, ranks, _ = ROWS[row]
        if isinstance(res, str):
            print(f"| {labels[row]:<44} | {workers:>7} | {ranks:>5} | {res}")
            rows_out.append({"row": row, "label": labels[row], "note": res})
            continue
        b = best(res)
        vs = f"{best(trl)['iteration_s'] / b['iteration_s']:.2f}x" if trl else "-"
        cells = [f"{b['iteration_s']:.2f}"] + [f"{b[k]:.2f}" for k in PHASES] + [
            f"{b['cpu_s']:.2f}", str(b["policy_tokens"]), f"{b['policy_tokens'] / b['iteration_s']:.0f}", vs]
        print(f"| {labels[row]:<44} | {workers:>7} | {ranks:>5} | "
              + " | ".join(c.rjust(w) for c, w in zip(cells, widths[3:])) + " |")
        rows_out.append({"row": row, "label": labels[row], "workers": workers, "ranks": ranks, **b,
                         "policy_tokens_s": b["policy_tokens"] / b["iteration_s"], "detail": res})

    print("\nratios (the fastest iterations' seconds):")
    if base and trl:
        b, t = best(base), best(trl)
        tps = (b["policy_tokens"] / b["iteration_s"]) / (t["policy_tokens"] / t["iteration_s"])
        print(f"  Turnstile vs TRL: {t['iteration_s'] / b['iteration_s']:.2f}x faster per iteration, {tps:.2f}x "
              f"the policy tokens/s (target: >= 3x per iteration); {t['cpu_s'] / b['cpu_s']:.2f}x fewer CPU seconds "
              f"per iteration, {(t['cpu_s'] / t['policy_tokens']) / (b['cpu_s'] / b['policy_tokens']):.2f}x per "
              "policy token (robust to other processes' load)")
    for row, what in (("turnstile-2w", "2 rollout workers vs 1"), ("turnstile-2r", "2 learner ranks vs 1")):
        if base and row in ok:
            key = "collect_s" if row.endswith("w") else "update_s"
            print(f"  {what}: iteration {best(base)['iteration_s'] / best(ok[row])['iteration_s']:.2f}x, "
                  f"{'collect' if key == 'collect_s' else 'update'} {best(base)[key] / best(ok[row])[key]:.2f}x "
                  "(> 1 = faster)")
    syncs = [f"{labels[r]} {best(ok[r])['sync_s']:.3f} s" for r in ("turnstile", "turnstile-2w", "turnstile-2r")
             if r in ok]
    if syncs:
        print(f"  weight sync per update (gather + push to every worker): {'; '.join(syncs)}")
    print("\nper row: timed iterations (s), warm-up (s), CPU s per wall s, episode tokens (mean), mean return, "
          "load average (1 min)")
    for row in args.rows:
        res = results[row]
        if isinstance(res, dict):
            its = [round(r["iteration_s"], 2) for r in res["rounds"]]
            b = best(res)
            loads = [round(r["loadavg"], 2) for r in res["rounds"]]
            print(f"  {row:<13} {its} warm-up {res['warmup']['iteration_s']:.1f}  cpu/wall "
                  f"{b['cpu_s'] / b['iteration_s']:.2f}  tokens/episode "
                  f"{b['episode_tokens']:.0f}  return {b['mean_return']:.3f}  load {loads}")
    if max(load_before[0], load_after[0]) > 0.5 + args.threads or os.cpu_count() < 2 * args.threads:
        print("WARNING: the machine was loaded (load average above the cores this bench uses): the numbers are noisy")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "policy": policy_name, "cpu": machine_name(),
                                              "loadavg_before": load_before, "loadavg_after": load_after,
                                              "trl": trl_version, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
