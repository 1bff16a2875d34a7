"""Settings of the `swe` env: where its instances come from, turns, output lengths, test limits."""

from __future__ import annotations

from pydantic import Field

from ..base import BaseEnvConfig
from .sandbox import SandboxConfig


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
