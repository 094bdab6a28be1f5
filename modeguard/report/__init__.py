"""Reporting: violations as data, and their rendering as text, rich, HTML and JSON."""

from .violation import Violation
from .render import Report, ModeMap, SCHEMA_VERSION

__all__ = ["Violation", "Report", "ModeMap", "SCHEMA_VERSION"]
