"""The experiment schema and its loader: YAML recipe + `key=value` overrides -> validated config.

Each section's schema lives next to the code that consumes it (the model's in agents/model.py, the
environment's in its envs/ package); this module assembles them, so that one `Experiment` object
is all a builder needs. Every wrong key or value fails here, before any work starts, with a message
that names the key, where it came from (the file or the command line) and the closest valid key.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import envs
from agents.model import VLLM_ARCHS, ModelConfig
from agents.tokenizer import TokenizerConfig
from rollout.runner import RolloutConfig
from rollout.worker import RayConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RuntimeConfig(_Section):
    """Where and how tensors live: shared by the SFT learner, the RL learner and the engines."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16/fp16: low-precision weights with fp32 master copies in the optimizer (DeepSpeed's mixed
    # precision). amp_bf16/amp_fp16: fp32 weights, matmuls autocast to 16 bits — on CPUs with
    # AVX512-BF16 or AMX this doubles training speed for small models; on CPUs without them (AVX2
    # only) oneDNN emulates bf16 and a step ran 11x slower than fp32. auto: amp_bf16 where the
    # hardware computes in bf16 (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX), else
    # fp32 — resolved by each process on its own device (algos/runtime.resolve_runtime).
    precision: Literal["auto", "fp32", "bf16", "fp16", "amp_bf16", "amp_fp16"] = "fp32"
    zero_stage: int = Field(0, ge=0, le=3)
    offload_optimizer: bool = Field(False, description="ZeRO CPU offload of optimizer state (stages 1-3)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None = the cores free to the "
                                "process (its CPU affinity, capped by a cgroup CPU quota)")
    # compile: the learners' models (the RL policy and critic, the SFT model) run through
    # torch.compile: inductor fuses the norms, RoPE, activations, casts and the attention softmax
    # between the matmuls (on CPU attention runs as matmuls + softmax, transformers' eager
    # attention, which inductor fuses; torch's CPU flash-attention backward is slow), and a torch
    # AdamW takes its fused kernel. The first steps pay the compiling (~25 s for a 34M policy on 2
    # cores; cached on disk for later processes); it changes floating-point rounding only. On a Xeon
    # with AMX, an RL update of the 34M policy in bf16 took 0.72x the eager time (docs/learner_bench.md).
    compile: bool = False


class DemoConfig(BaseModel):
    """Which expert demonstrations SFT imitates: how many, and the env's own options.

    `num_examples` is every env's; the other keys belong to the env's demonstration builder and
    are checked against its schema (envs.spec(name).demo_options, e.g. Countdown's strategies,
    TextWorld's mistakes) by load_config. Only the keys a recipe sets reach the builder.
    """

    model_config = ConfigDict(extra="allow")
    num_examples: int = Field(20_000, ge=1, description="demonstrations, one per train task")

    def options(self) -> dict:
        """The env-specific keys the recipe set (keyword arguments of the env's builder)."""
        return dict(self.model_extra or {})


class SFTConfig(_Section):
    demos: DemoConfig = DemoConfig()
    init_from: str | None = Field(
        None, description="start from this policy (a run, checkpoint or model folder, e.g. one `launch.py convert` "
        "wrote) and its tokenizer instead of a fresh model of the recipe's model section; None = fresh")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor, as a fraction of lr")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="eval on the valid split every N steps; 0 = none "
                            "(the test split eval.split is played once, at the end)")
    eval_tasks: int = Field(200, ge=1, description="valid-split tasks in the periodic eval")
    save_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)


class EvalConfig(_Section):
    """The final evaluation: a test split (never `valid`, which periodic evals and tuning read)
    or a user's task file."""

    split: str = "heldout_unseen"
    num_tasks: int | None = Field(None, ge=1, description="None = the whole split")
    problems_file: str | None = Field(None, description="a JSONL file of tasks to run instead of a split")
    batch_size: int = Field(256, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class RewardConfig(_Section):
    """sparse: one reward at the end of the episode; dense: each turn's progress on its last token
    (an episode sums to ≤ 1). The env computes both; this key picks one for every algorithm."""

    density: Literal["sparse", "dense"] = "sparse"


class RLConfig(_Section):
    """The RL stage: which algorithm, how much data per update, and the loss coefficients."""

    algo: Literal["ppo", "grpo", "rloo"] = "grpo"
    init_from: str | None = Field(
        None, description="the SFT policy (a run, checkpoint or model folder); None = <out_dir>/sft. "
        "If it holds no policy yet, `train` runs the recipe's SFT stage there first.")
    iterations: int = Field(50, ge=1)
    tasks_per_iter: int = Field(16, ge=1, description="distinct train tasks per iteration")
    skip_sft_tasks: bool = Field(
        False, description="draw RL tasks only from train tasks past the first sft.demos.num_examples, the "
        "ones SFT imitated (a finite train split such as TextWorld's games; Countdown draws fresh problems "
        "anyway): a policy that has memorised its demos' games learns nothing from replaying them")
    group_size: int = Field(8, ge=1, description="episodes per task (GRPO/RLOO baselines need ≥ 2)")
    epochs: int = Field(1, ge=1, description="passes over each collected batch")
    minibatch_size: int = Field(64, ge=1, description="episodes per optimizer step")
    micro_batch_size: int = Field(16, ge=1, description="episodes per forward/backward")
    lr: float = Field(1e-4, gt=0, description="the policy's learning rate")
    critic_lr: float | None = Field(None, gt=0, description="PPO's critic (its own optimizer); None = rl.lr")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="the policy's gradient-norm clip; 0 disables")
    critic_grad_clip: float | None = Field(None, ge=0, description="the critic's own clip; None = rl.grad_clip")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip ε")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ (PPO)")
    value_clip: float = Field(0.2, ge=0, description="PPO value clip; 0 disables")
    vf_coef: float = Field(0.5, ge=0)
    normalize_advantages: bool = Field(True, description="PPO: whiten advantages over the batch")
    std_normalize: bool = Field(True, description="GRPO: divide by the group's return std")
    group_credit: Literal["to_go", "episode"] = Field(
        "to_go", description="GRPO/RLOO: a token's return is its return-to-go G_k (to_go) or the whole episode's "
        "R (episode: the dense rewards earned before the token join the baseline, so a group that all won "
        "gives every token 0 instead of pushing down the tokens after the first progress)")
    loss_aggregation: Literal["token", "episode"] = Field(
        "token", description="average per-token losses over all policy tokens of a mini-batch (token) or "
        "per episode, then over episodes (episode: a long failed episode weighs no more than a short win)")
    kl_coef: float = Field(0.0, ge=0, description="KL(π_θ ‖ π_ref) to the frozen start policy (its gradient is "
                           "exact: algos/losses.py); 0 frees the reference")
    entropy_coef: float = Field(0.0, ge=0)
    tis_cap: float = Field(2.0, ge=0, description="truncated importance weight cap C; 0 disables")
    routing_replay: bool = Field(
        False, description="model.arch=moe: the learner routes every token the rollout engine ran to the experts "
        "that engine chose (verl's routing replay), so π_old, π_θ and μ compare the same experts even where "
        "the learner's own top-k would pick others (near-ties, bf16 rollouts); the torch engine records them")
    dynamic_sampling: bool = Field(
        False, description="GRPO/RLOO: train only on groups whose episode returns differ, playing more tasks "
        "(up to rl.max_refills rounds) until rl.tasks_per_iter such groups are in hand (DAPO's dynamic sampling)")
    max_refills: int = Field(3, ge=0, description="rl.dynamic_sampling: extra rounds of tasks_per_iter tasks at most")
    eval_every: int = Field(10, ge=0, description="eval on the valid split every N iterations; 0 = none (the test "
                            "split is played before and after RL either way)")
    eval_samples: int = Field(
        0, ge=0, description="held-out evals also play this many episodes per task at rollout.temperature and "
        "report their success (sampled_accuracy): what RL optimises, and steadier than greedy success")
    eval_tasks: int = Field(200, ge=1, description="valid-split tasks in the periodic eval (the test split before and "
                            "after RL is eval.split, eval.num_tasks of it)")
    save_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.algo in ("grpo", "rloo") and self.group_size < 2:
            raise ValueError(f"rl.algo={self.algo} needs rl.group_size ≥ 2 (a group baseline), got {self.group_size}")
        if self.micro_batch_size > self.minibatch_size:
            raise ValueError("rl.micro_batch_size must be ≤ rl.minibatch_size")
        if self.dynamic_sampling and self.algo == "ppo":
            raise ValueError("rl.dynamic_sampling filters groups by their return spread, which only GRPO/RLOO's group "
                             "baselines depend on; use rl.algo=grpo or rloo (PPO's critic learns from every episode)")
        return self


class LearnerConfig(_Section):
    """How many processes run the RL update (algos/ranks.py). One rank runs in the driver process;
    several are Ray actors in one torch.distributed group (NCCL on GPUs, gloo on CPUs) under
    DeepSpeed data parallelism (runtime.zero_stage 0-3 partitions across them): each update's
    episodes are split across the ranks, and the gradients are averaged."""

    num_ranks: int = Field(1, ge=1, description="learner ranks (data-parallel); 1 = in the driver process")
    gpus_per_rank: float = Field(0, ge=0, description="GPUs each rank's Ray actor reserves (several ranks)")
    cpus_per_rank: float = Field(1, gt=0, description="CPUs each rank's Ray actor reserves (several ranks)")
    threads_per_rank: int | None = Field(None, ge=1, description="torch threads per rank; None = cpus_per_rank")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each rank reserves (e.g. {learner_node: 1})")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the ranks' reservation (PACK: as few nodes as "
        "possible, for fast all-reduces)")


def rl_sampling_error(rollout: RolloutConfig) -> str | None:
    """Why RL cannot learn from episodes sampled with these settings, or None. The learner scores
    softmax(logits / rollout.temperature), the distribution the engine sampled from; greedy play has
    no such distribution, and top-p's renormalised nucleus is not scored by the learner."""
    if rollout.temperature == 0:
        return ("rl needs sampled episodes: rollout.temperature must be > 0 (0 is greedy; the learner scores "
                "softmax(logits / rollout.temperature))")
    if rollout.top_p < 1:
        return (f"rl does not score top-p sampling: set rollout.top_p to 1 (got {rollout.top_p}); the learner's "
                "log-probs, ratios and KL are those of softmax(logits / rollout.temperature) over the whole vocabulary")
    return None


class EnvSection(BaseModel):
    """`env.name` picks the environment; its other keys are checked against that env's own schema."""

    model_config = ConfigDict(extra="allow")
    name: str


class Experiment(_Section):
    name: str
    seed: int = 0
    out_dir: str = Field(description="run folder: checkpoints, logs, metrics")
    data_dir: str = Field("data", description="cache of generated tasks and demonstrations")
    env: EnvSection
    tokenizer: TokenizerConfig = TokenizerConfig()
    model: ModelConfig = ModelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    sft: SFTConfig = SFTConfig()
    eval: EvalConfig = EvalConfig()
    reward: RewardConfig = RewardConfig()
    rl: RLConfig | None = Field(None, description="the RL stage; absent = an SFT-only recipe")
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _check_cross_section(self) -> Experiment:
        if self.rl is not None and self.learner.num_ranks > self.rl.minibatch_size:
            raise ValueError(f"learner.num_ranks={self.learner.num_ranks} exceeds rl.minibatch_size="
                             f"{self.rl.minibatch_size}: every rank needs episodes of each mini-batch")
        if self.runtime.offload_optimizer and self.runtime.zero_stage == 0:
            raise ValueError("runtime.offload_optimizer needs runtime.zero_stage ≥ 1")
        if self.runtime.compile and self.runtime.zero_stage == 3:
            raise ValueError("runtime.compile=true cannot run with runtime.zero_stage=3: ZeRO-3 gathers each "
                             "layer's partitioned weights in module hooks that torch.compile does not trace; "
                             "use zero_stage ≤ 2 or compile=false")
        if self.rl is not None and rl_sampling_error(self.rollout):
            raise ValueError(rl_sampling_error(self.rollout))
        if self.rollout.backend == "vllm" and self.model.arch not in VLLM_ARCHS:
            raise ValueError(f"rollout.backend=vllm cannot serve model.arch={self.model.arch}: vLLM serves "
                             f"{', '.join(VLLM_ARCHS)}; use rollout.backend=torch")
        if self.rollout.backend == "vllm" and self.model.context_broadcast:
            raise ValueError("rollout.backend=vllm cannot serve model.context_broadcast=true: vLLM's attention has "
                             "no uniform-attention term (agents/broadcast.py); use rollout.backend=torch")
        if self.rl is not None and self.rl.routing_replay:
            if self.model.arch != "moe":
                raise ValueError(f"rl.routing_replay needs model.arch=moe (model.arch={self.model.arch} "
                                 "routes nothing)")
            if self.rollout.backend != "torch":
                raise ValueError("rl.routing_replay needs rollout.backend=torch: the embedded engine records the "
                                 "experts it routed each token to; the vLLM engine reports none")
        if "reward_density" in (self.env.model_extra or {}):
            raise ValueError("set the reward density with reward.density (one switch for every algorithm), "
                             "not env.reward_density")
        return self

    def env_options(self) -> dict[str, Any]:
        """The env section without its `name`, plus reward.density: the keyword arguments of envs.make."""
        opts = {k: v for k, v in self.env.model_dump().items() if k != "name"}
        opts["reward_density"] = self.reward.density
        return opts


class ConfigError(ValueError):
    """A config that cannot run; the message says which key, where from, and what is wrong."""


def _describe(err: dict, schema: type[BaseModel], prefix: tuple, origin, extra_keys: tuple[str, ...] = ()) -> str:
    loc = prefix + tuple(map(str, err["loc"]))
    if err["type"] == "value_error" and (not err["loc"] or isinstance(err.get("input"), dict)):
        # a cross-field check of a whole section (or of the recipe): its message names the keys it
        # read; blame the one the command line set, if any (else the section, and the file)
        section = ".".join(loc)
        named = [k for k in dict.fromkeys(_DOTTED_KEY.findall(err["msg"]))
                 if (not section or k.startswith(section + ".")) and origin(k) == "command-line override"]
        if not named:  # an override elsewhere in the section is not to blame
            return envs.describe_error(err, schema, prefix, origin(section, inside=False), extra_keys)
        loc = tuple(named[0].split("."))
        err = {**err, "loc": loc[len(prefix):]}
    return envs.describe_error(err, schema, prefix, origin(".".join(loc)), extra_keys)


_DOTTED_KEY = re.compile(r"\b[a-z_]+(?:\.[a-z_][a-z_0-9]*)+\b")  # e.g. rl.group_size in an error message


def _read_recipe(path: Path, chain: tuple[Path, ...] = ()):
    """A recipe's YAML; `base: other.yaml` (relative to the file) is read first and overlaid."""
    if not path.is_file():
        where = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(map(str, chain + (path,)))}")
    try:
        raw = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as e:
        raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    base = raw.pop("base", None) if isinstance(raw, DictConfig) else None
    if base is None:
        return raw
    merged = OmegaConf.merge(_read_recipe(path.parent / str(base), chain + (path.resolve(),)), raw)
    if "name" not in raw:  # a derived recipe is its own run, never its base's
        merged["name"] = path.stem
    return merged


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read a YAML recipe (and its `base` chain), apply `key=value` overrides, validate everything."""
    path = Path(path)
    raw = _read_recipe(path)
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command-line overrides must look like key=value, got: {' '.join(bad)}")
    override_keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    try:
        merged = OmegaConf.merge(raw, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")

    def origin(key: str, inside: bool = True) -> str:
        """Where `key` was set: the command line when an override set it, the section holding it, or
        (`inside`) a key inside it (`foo.bar=1` for an unknown section `foo`); else the recipe file."""
        overridden = any(o == key or key.startswith(o + ".") or (inside and o.startswith(key + "."))
                         for o in override_keys)
        return "command-line override" if overridden else f"in {path}"

    data.setdefault("name", path.stem)
    data.setdefault("out_dir", f"runs/{data['name']}")
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err, Experiment, (), origin) for err in e.errors())) from None
    # The env section is checked by its own schema, picked by name.
    known = envs.list_envs()
    if exp.env.name not in known:
        close = envs.closest(exp.env.name, known)
        hint = f"; did you mean '{close}'?" if close else ""
        raise ConfigError(f"unknown env.name '{exp.env.name}' ({origin('env.name')}){hint} Known: {', '.join(known)}")
    env_schema = envs.config_class(exp.env.name)
    try:
        env_schema.model_validate(exp.env_options())
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err, env_schema, ("env",), origin) for err in e.errors())) from None
    # So are the env's demonstration options (sft.demos besides num_examples).
    demo_schema = envs.spec(exp.env.name).demo_options
    try:
        demo_schema.model_validate(exp.sft.demos.options())
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err, demo_schema, ("sft", "demos"), origin, ("num_examples",))
                                     for err in e.errors())) from None
    if exp.rollout.constrain_actions and not envs.format_for(exp.env.name).lists_choices:
        raise ConfigError(f"bad value for 'rollout.constrain_actions' ({origin('rollout.constrain_actions')}): "
                          f"env '{exp.env.name}' lists no admissible actions to constrain decoding to")
    return exp


def save_config(exp: Experiment, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(exp.model_dump(mode="json")), path)
