"""Errors of the composition root.

PointsmanError
├── ConfigError      a config file (or text) that cannot be used: every problem, with its path
└── AdminError       a running instance that could not be reached or refused a request
"""

from __future__ import annotations

from dataclasses import dataclass


class PointsmanError(Exception):
    """Base of every error pointsman raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    path: str  # e.g. "listeners[0].routes[1].split[0].to"; "" for the whole document
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ConfigError(PointsmanError):
    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [
            f"{self.source}: invalid config ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''})"
        ]
        lines += [f"  {self.source}: {problem}" for problem in self.problems]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.source,
            "errors": [{"path": p.path, "reason": p.reason} for p in self.problems],
        }


class AdminError(PointsmanError):
    """The admin API of a running instance could not be reached or answered with an error."""
