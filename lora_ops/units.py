"""Byte units, defined once for every report and plan."""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30
