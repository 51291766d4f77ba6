"""Placeholder until the neutropenia engine lands (issue 3): no cards."""

from __future__ import annotations

from cds_hooks.models import Card
from service.assessment import Assessment


def render(assessment: Assessment) -> list[Card]:
    """The cards for ``assessment``."""
    return []
