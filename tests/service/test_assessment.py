"""The engine's entry points: ``assess`` and the design.md §3 extension."""

from __future__ import annotations

from datetime import datetime, timezone

from service.assessment import assess, assessment_extension

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=timezone.utc)


def test_assess_no_data_gives_only_evaluation_time() -> None:
    assert assessment_extension(assess([], now=NOW)) == {"evaluatedAt": "2025-03-10T12:00:00Z"}


def test_assess_unavailable_key_is_a_data_issue() -> None:
    ext = assessment_extension(assess([], now=NOW, unavailable={"labs": "timeout"}))
    assert ext["dataIssues"] == [{"code": "data-unavailable", "detail": "labs: timeout"}]
