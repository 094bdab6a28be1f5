"""Observation: how modeguard sees modes being set, modules being sensitive, graphs being
backpropagated, and how its hooks stay out of copies. Nothing in here decides whether
something is a bug (see rules/). Implementation: these modules may change between
releases."""

from . import graph, modes, pickling, sensitivity, snapshot  # noqa: F401  (modeguard.observe.modes...)
