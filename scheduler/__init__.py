"""scheduler: sans-IO placement core (feasibility checkers, rankers, plan). See README.md."""

from scheduler.model import Affinity, Allocation, Constraint, Failure, Job, Node, Plan, Resources, Spread
from scheduler.plan import place, place_into

__all__ = [
    "Affinity",
    "Allocation",
    "Constraint",
    "Failure",
    "Job",
    "Node",
    "Plan",
    "Resources",
    "Spread",
    "place",
    "place_into",
]
