"""Rollout throughput: the embedded TorchEngine vs transformers `generate` (and vLLM when installed).

Every backend gets the same randomly initialised Llama, the same token-id prompts and the same
number of new tokens, with sampling (temperature 1, no top-k/top-p) and the log-prob of every
sampled token returned. No stop tokens, so every row generates exactly `--new-tokens` tokens.

Rows:
  * single turn: `--prompts` prompts x `--new-tokens` tokens, on the 26M-parameter Llama (hidden
    512, 8 layers, head_dim 64, MLP 1376, vocab 512) and on a tiny one (hidden 128, 4 layers);
  * multi-turn: `--turns` turns where each prompt is the previous prompt + completion + an
    observation of `--obs-tokens` tokens; the engine with `sessions` (prefix reuse) vs without.

vLLM runs in a child process (its CPU backend pins threads process-wide) and only when
`import vllm` works; otherwise its rows say "not installed".

    python bench/rollout.py                 # full table (~1-2 minutes on 2 cores)
    python bench/rollout.py --quick         # smaller, for a smoke check
    python bench/rollout.py --threads 1 --no-vllm
    python bench/rollout.py --dtype bfloat16  # every backend in bf16 (the engine's decode attention compiled)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB, PAD, BOS, EOS = 512, 0, 1, 2
MODELS = {
    # name: (hidden, layers, heads, MLP width); 1376 = 8/3 x 512 rounded, Llama's ratio: 25.6M parameters
    "llama-26M": (512, 8, 8, 1376),
    "tiny-1M": (128, 4, 2, 512),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    model: str
    scenario: str
    backend: str
    tokens: int = 0
    seconds: float = float("nan")
    note: str = ""

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.tokens else float("nan")


def build(name: str):
    import torch

    from agents.model import ModelConfig, build_model, count_parameters

    hidden, layers, heads, mlp = MODELS[name]
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=mlp, max_seq_len=1024)
    model = build_model(cfg, VOCAB, PAD, BOS, EOS).eval()
    model.generation_config.eos_token_id = None  # run every row to the full length
    return model, count_parameters(model)


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi) - 1)] for _ in range(n)]


def observations(n: int, length: int, turn: int) -> list[list[int]]:
    import random

    rng = random.Random(1000 + turn)
    return [[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(n)]


# -- backends: each is gen(prompts, keys) -> list of new-token lists (log-probs computed, dropped) --

def hf_generate_fn(model, new_tokens: int):
    import torch

    def gen(prompts, keys=None):
        n, width = len(prompts), max(map(len, prompts))
        ids = torch.full((n, width), PAD, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, pad_token_id=PAD, eos_token_id=None,
                output_scores=True, return_dict_in_generate=True,
            )
            logp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        new = out.sequences[:, width:].tolist()
        logp.tolist()
        return new

    return gen


def engine_fn(engine, new_tokens: int, sessions: bool):
    from rollout.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)

    def gen(prompts, keys=None):
        out = engine.generate(prompts, params, sessions=keys if sessions else None)
        return [c.token_ids for c in out]

    return gen


def timed_single(gen, prompts) -> tuple[int, float]:
    t = time.perf_counter()
    out = gen(prompts, None)
    return sum(map(len, out)), time.perf_counter() - t


def timed_multi(gen, prompts, turns: int, obs_tokens: int, reset=None) -> tuple[int, float]:
    if reset:
        reset()
    keys = list(range(len(prompts)))
    total, seconds = 0, 0.0
    for turn in range(turns):
        t = time.perf_counter()
        out = gen(prompts, keys)
        seconds += time.perf_counter() - t
        total += sum(map(len, out))
        prompts = [p + c + o for p, c, o in zip(prompts, out, observations(len(prompts), obs_tokens, turn))]
    return total, seconds


def best_of(repeats: int, fn, *args, **kwargs) -> tuple[int, float]:
    runs = [fn(*args, **kwargs) for _ in range(repeats)]
    best = min(runs, key=lambda r: r[1])
    log(f"  {best[0]} tokens in {best[1]:.2f}s = {best[0] / max(best[1], 1e-9):.0f} tokens/s (best of {repeats})")
    return best


# -- vLLM, in a child process --------------------------------------------------------------------

def vllm_worker(spec_path: str) -> None:
    """Child: serve the saved model with VLLMEngine and time the same workloads; print JSON."""
    spec = json.loads(Path(spec_path).read_text())
    from rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(spec["folder"], dtype=spec["dtype"], max_model_len=1024, seed=0)
    gen = engine_fn(eng, spec["new_tokens"], sessions=False)
    gen(spec["prompts"], None)  # warm-up
    res = {"single": best_of(spec["repeats"], timed_single, gen, spec["prompts"])}
    if spec["multi"]:
        mt = engine_fn(eng, spec["turn_tokens"], sessions=False)
        res["multi"] = best_of(spec["repeats"], timed_multi, mt, spec["prompts"], spec["turns"], spec["obs_tokens"],
                               reset=eng.llm.reset_prefix_cache)
    res["device"] = eng.device
    print("VLLM_RESULT " + json.dumps(res), flush=True)


def run_vllm(model, name: str, prompts, args, multi: bool) -> dict | str:
    try:
        import vllm  # noqa: F401
    except Exception:
        return "not installed"
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        spec = {"folder": folder, "dtype": args.dtype, "prompts": prompts, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "multi": multi, "turns": args.turns, "turn_tokens": args.turn_tokens,
                "obs_tokens": args.obs_tokens}
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(args.threads),
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}")
        env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        proc = subprocess.run([sys.executable, __file__, "--vllm-worker", str(spec_path)], env=env,
                              capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("VLLM_RESULT "):
            return json.loads(line.removeprefix("VLLM_RESULT "))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
    return f"failed: {tail[0][:80]}"


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens, 2 turns, one repeat")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--turn-tokens", type=int, default=32, help="new tokens per turn (multi-turn rows)")
    ap.add_argument("--obs-tokens", type=int, default=24, help="observation tokens appended per turn")
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--multi-model", default="llama-26M", choices=list(MODELS))
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-generate-multi", action="store_true", help="skip transformers in the multi-turn rows")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and KV cache, every backend")
    ap.add_argument("--compile-attention", default="auto", choices=["auto", "on", "off"],
                    help="TorchEngine's compiled decode attention (auto: on for bf16 on CPU)")
    ap.add_argument("--vllm-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_worker:
        return vllm_worker(args.vllm_worker)
    if args.quick:
        args.prompts, args.new_tokens, args.turns, args.turn_tokens, args.repeats = 8, 16, 2, 8, 1

    import torch
    import transformers

    from rollout.engine import TorchEngine

    torch.set_num_threads(args.threads)
    prompts = make_prompts(args.prompts, *args.prompt_len, seed=0)
    rows: list[Row] = []
    params_of = {}
    for name in args.models:
        model, n_params = build(name)
        model = model.to(getattr(torch, args.dtype))
        params_of[name] = n_params
        scen = f"{args.prompts}x{args.new_tokens}"
        hf = hf_generate_fn(model, args.new_tokens)
        eng = TorchEngine(model, pad_token_id=PAD, dtype=getattr(torch, args.dtype),
                          compile_attention={"auto": None, "on": True, "off": False}[args.compile_attention])
        emb = engine_fn(eng, args.new_tokens, sessions=False)
        for gen in (hf, emb):
            gen(prompts)  # warm-up (also compiles the engine's kernels for these shapes)
        log(f"{name}: transformers generate, {scen}")
        rows.append(Row(name, scen, "transformers generate", *best_of(args.repeats, timed_single, hf, prompts)))
        log(f"{name}: TorchEngine, {scen}")
        rows.append(Row(name, scen, "TorchEngine", *best_of(args.repeats, timed_single, emb, prompts)))
        multi = name == args.multi_model and args.turns > 0
        if multi:
            mscen = f"{args.turns} turns x {args.prompts}x{args.turn_tokens} (+{args.obs_tokens} obs)"
            if not args.no_generate_multi:
                hfm = hf_generate_fn(model, args.turn_tokens)
                log(f"{name}: transformers generate, {mscen}")
                rows.append(Row(name, mscen, "transformers generate",
                                *best_of(args.repeats, timed_multi, hfm, prompts, args.turns, args.obs_tokens)))
            for sessions, label in ((False, "TorchEngine"), (True, "TorchEngine + sessions")):
                gen = engine_fn(eng, args.turn_tokens, sessions)
                log(f"{name}: {label}, {mscen}")
                rows.append(Row(name, mscen, label, *best_of(args.repeats, timed_multi, gen, prompts, args.turns,
                                                             args.obs_tokens, reset=eng.clear_sessions)))
        if args.no_vllm:
            continue
        log(f"{name}: vLLM (child process)")
        res = run_vllm(model, name, prompts, args, multi)
        if isinstance(res, str):
            rows.append(Row(name, scen, "vLLM-CPU", note=res))
        else:
            label = f"vLLM-{res['device'].upper()}"
            rows.append(Row(name, scen, label, *res["single"]))
            if multi:
                rows.append(Row(name, mscen, f"{label} (prefix caching)", *res["multi"]))

    compiled = "on" if eng._decoder is not None and eng._decoder.attend_one is not None else "off"
    from rollout.machine import machine_name

    print(f"\nmachine: {machine_name()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}; {args.dtype}, compiled decode attention {compiled}, "
          f"sampling T=1 with log-probs, prompt lengths {args.prompt_len[0]}-{args.prompt_len[1]}")
    header = (f"| {'model':<18} | {'workload':<34} | {'backend':<26} | {'tokens':>6} | {'s':>6} | {'tokens/s':>8} "
              f"| {'x vs generate':>13} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    base = {(r.model, r.scenario): r.tps for r in rows if r.backend == "transformers generate"}
    for r in rows:
        label = f"{r.model} ({params_of[r.model] / 1e6:.1f}M)"
        if r.note:
            dash = "-"
            print(f"| {label:<18} | {r.scenario:<34} | {r.backend:<26} | {dash:>6} | {dash:>6} | {dash:>8} "
                  f"| {r.note:>13} |")
            continue
        ref = base.get((r.model, r.scenario))
        speed = f"{r.tps / ref:.2f}x" if ref else ""
        print(f"| {label:<18} | {r.scenario:<34} | {r.backend:<26} | {r.tokens:>6} | {r.seconds:>6.2f} | "
              f"{r.tps:>8.0f} | {speed:>13} |")


if __name__ == "__main__":
    main()
