"""Observation: how modeguard sees modes being set, modules being sensitive, and graphs
being backpropagated. Nothing in here decides whether something is a bug (see rules/)."""

from . import graph, modes, sensitivity, snapshot  # noqa: F401  (modeguard.observe.modes...)
