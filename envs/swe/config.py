"""Settings of the `swe` env: where its instances come from, turns, output lengths, test limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..base import BaseEnvConfig
from . import mutations
from .projects import PINNED
from .sandbox import SandboxConfig


class SynthSettings(BaseModel):
    """What decides the synthesized instances (all of it goes into the cache key: envs/swe/synth.py)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    max_per_function: int = Field(2, ge=1, description="bugs kept per function at most")
    max_candidates: int = Field(6, ge=1, description="mutations run against the tests per function at most")
    kinds: tuple[str, ...] = mutations.KINDS
    max_tests: int = Field(200, ge=1, description="covering tests run per mutation (the most specific)")
    max_fail_to_pass: int = Field(20, ge=1)
    max_pass_to_pass: int = Field(30, ge=0)
    max_test_seconds: float = Field(2.0, gt=0, description="slower tests are never used")
    max_functions: int | None = Field(None, ge=1, description="per project, for quick runs")
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    timeout_base_s: float = Field(20.0, description="a run's time limit: this plus timeout_factor times "
                                  "the tests' clean durations")
    timeout_factor: float = 10.0

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in v if k not in mutations.KINDS]
        if unknown:
            raise ValueError(f"unknown mutation kinds {unknown}; known: {list(mutations.KINDS)}")
        return v


# The recipes' synthesis: 80 functions per project (713 instances from the six pinned projects,
# about 40 minutes on 2 cores: docs/swe.md). None would mutate every covered function (hours).
DEFAULT_SYNTH = SynthSettings(max_functions=80)


class SweConfig(BaseEnvConfig):
    """Config of the `swe` env and of its task splits (`env.*` in a recipe).

    Instances come from the synthesized cache (`cache_dir`, made by `launch.py gen-data`) unless
    `instances_file` names a user's SWE-Gym / SWE-bench file, whose repositories are under
    `repos_dir`. A user's instance goes to the split its `split` field names, else to one drawn
    from sha256 of its instance_id (80/10/10 over train/valid/heldout)."""

    cache_dir: str = Field("data/swe", description="the synthesis cache (launch.py gen-data)")
    instances_file: str | None = Field(None, description="a user's SWE-Gym/SWE-bench JSON or JSONL file")
    repos_dir: str | None = Field(None, description="the repositories of instances_file's instances")
    max_turns: int = Field(30, ge=1, description="tool calls before the episode is graded as it stands")
    output_chars: int = Field(3000, ge=200, description="a tool's reply is cut to this (head and tail)")
    view_lines: int = Field(60, ge=1, description="lines `view` shows when no range is given")
    max_matches: int = Field(40, ge=1, description="lines `search` shows at most")
    tool_timeout_s: float = Field(30.0, gt=0, description="time limit of a `bash`, `search` or `run_tests` call")
    test_timeout_s: float = Field(300.0, gt=0, description="time limit of the grading test run")
    show_tools: bool = Field(True, description="the first observation lists the tools and their syntax")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="limits of every command")
    projects: list[str] | None = Field(None, description="the pinned projects to synthesize from (None: all "
                                       "of envs/swe/projects.py's PINNED)")
    synth: SynthSettings = Field(default_factory=lambda: DEFAULT_SYNTH.model_copy(),
                                 description="what decides the synthesized instances (launch.py gen-data)")
    gen_workers: int = Field(2, ge=1, description="processes that validate bugs in launch.py gen-data")

    @field_validator("projects")
    @classmethod
    def _known_projects(cls, v: list[str] | None) -> list[str] | None:
        names = [p.name for p in PINNED]
        unknown = [n for n in v or [] if n not in names]
        if unknown:
            raise ValueError(f"unknown SWE projects {unknown}; pinned are {sorted(names)}")
        if v is not None and not v:
            raise ValueError("an empty list: name at least one project, or leave it unset for all")
        return v
