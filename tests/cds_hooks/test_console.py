"""Terminal rendering of cards: indicators and colours, the detail Markdown, suggestions, links, reasons."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest

from cds_hooks.testing.console import (
    Styler,
    inline,
    outcome_lines,
    plain,
    render_card,
    render_markdown,
    render_response,
    render_table,
    sort_cards,
    use_colour,
    wrap,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
DETAIL = """| Result | Value | Time |
|---|---|---|
| ANC, measured | 400/uL (grade 4) | 2025-03-10 08:00 UTC |

Fever with an ANC below 1000/uL: this is **febrile neutropenia**.

## Act now

- Take blood cultures (at least two sets); do not let this delay antibiotics.
- Give the first dose of empirical broad-spectrum antibiotics within 1 hour of triage.
  1. nested step
"""


def card(indicator: str = "critical", **extra: Any) -> dict[str, Any]:
    """A card like the service's: uuid, source with topic, detail, a suggestion, a link, override reasons."""
    return {
        "uuid": f"card-{indicator}", "indicator": indicator, "summary": f"A {indicator} summary",
        "source": {"label": "Neutropenia CDS", "url": "https://neutropenia-cds.org/",
                   "topic": {"code": "febrile-neutropenia"}},
        "detail": DETAIL, "selectionBehavior": "any",
        "suggestions": [{"label": "Order blood cultures", "uuid": "sugg-1", "isRecommended": True,
                         "actions": [{"type": "create", "description": "Create a draft stat order",
                                      "resource": {"resourceType": "ServiceRequest"}}]}],
        "links": [{"label": "IDSA guideline", "url": "https://www.idsociety.org/", "type": "absolute"}],
        "overrideReasons": [{"system": "https://example.org/reasons", "code": "already-treated",
                             "display": "Already treated"}],
        **extra,
    }


class FakeStream(io.StringIO):
    """A text stream that says whether it is a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "environ", "mode", "expected"),
    (
        (True, {}, "auto", True),
        (True, {"NO_COLOR": "1"}, "auto", False),
        (True, {"NO_COLOR": ""}, "auto", True),
        (True, {"TERM": "dumb"}, "auto", False),
        (False, {}, "auto", False),
        (False, {}, "always", True),
        (True, {}, "never", False),
    ),
    ids=["tty", "no-color", "empty-no-color-ignored", "dumb-terminal", "not-a-tty", "always", "never"],
)
def test_use_colour_follows_tty_no_color_and_mode(tty: bool, environ: dict[str, str], mode: str,
                                                  expected: bool) -> None:
    assert use_colour(FakeStream(tty), environ, mode) is expected


@pytest.mark.parametrize(("indicator", "sgr"), (("critical", "31"), ("warning", "33"), ("info", "34")),
                         ids=["critical-red", "warning-yellow", "info-blue"])
def test_render_card_colours_each_indicator(indicator: str, sgr: str) -> None:
    lines = render_card(card(indicator), Styler(colour=True), 100)
    assert f"\x1b[1;{sgr}m[{indicator.upper()}]\x1b[0m" in lines[0]
    assert "A " + indicator + " summary" in ANSI.sub("", lines[0])


@pytest.mark.parametrize("indicator", ("critical", "warning", "info"))
def test_render_card_without_colour_has_no_escape_codes_but_names_the_indicator(indicator: str) -> None:
    text = "\n".join(render_card(card(indicator), Styler(colour=False), 100))
    assert "\x1b" not in text
    assert text.startswith(f"[{indicator.upper()}] A {indicator} summary")


def test_render_card_shows_everything_needed_for_feedback() -> None:
    text = "\n".join(render_card(card(), Styler(), 100))
    for expected in ("card uuid: card-critical", "Suggestions (select any):", "★ Order blood cultures",
                     "uuid: sugg-1", "create ServiceRequest: Create a draft stat order",
                     "IDSA guideline <https://www.idsociety.org/>", "system: https://example.org/reasons",
                     "already-treated: Already treated", "source: Neutropenia CDS <https://neutropenia-cds.org/>",
                     "topic febrile-neutropenia"):
        assert expected in text, expected


def test_render_card_without_uuid_says_feedback_is_impossible() -> None:
    minimal = {"summary": "Just a summary", "indicator": "info", "source": {"label": "S"}}
    text = "\n".join(render_card(minimal, Styler(), 80))
    assert "feedback is not possible" in text
    assert "Suggestions" not in text and "Links" not in text and "Override" not in text


def test_render_markdown_keeps_tables_headings_bold_and_lists_readable() -> None:
    lines = render_markdown(DETAIL, 100, Styler())
    text = "\n".join(lines)
    assert re.search(r"^Result\s{2,}Value\s{2,}Time$", lines[0])
    assert lines[1].startswith("─") and lines[2].startswith("ANC, measured")
    # Columns line up: each header starts where its values start.
    assert lines[0].index("Value") == lines[2].index("400/uL")
    assert "this is febrile neutropenia." in text and "**" not in text and "##" not in text
    assert "\nAct now\n" in text
    assert "• Take blood cultures" in text and "  1. nested step" in text


def test_render_markdown_bold_and_headings_are_bold_with_colour() -> None:
    text = "\n".join(render_markdown(DETAIL, 100, Styler(colour=True)))
    assert "this is \x1b[1mfebrile neutropenia\x1b[0m." in text
    assert "\x1b[1mAct now\x1b[0m" in text


@pytest.mark.parametrize("width", (40, 60, 100), ids=lambda w: f"width-{w}")
def test_render_markdown_wraps_to_the_width(width: int) -> None:
    lines = render_markdown(DETAIL.split("\n\n", 1)[1], width, Styler(colour=True), indent="    ")
    assert max(len(ANSI.sub("", line)) for line in lines) <= width
    # Hanging indent: a wrapped bullet continues under its text, not under the bullet.
    bullet = next(i for i, line in enumerate(lines) if "• Give the first" in line)
    assert lines[bullet + 1].startswith("      ") and not lines[bullet + 1].strip().startswith("•")


def test_render_table_too_wide_becomes_header_value_lines() -> None:
    rows = [["Result", "Value"], ["Absolute neutrophil count, measured", "400/uL (grade 4) and a long note"]]
    lines = render_table(rows, 30, Styler())
    assert lines[0] == "• Result: Absolute neutrophil" and "Value: 400/uL" in "\n".join(lines)
    assert max(len(line) for line in lines) <= 30


def test_inline_markdown_links_code_and_bold() -> None:
    pieces = inline("See [NICE](https://nice.org.uk) and `code` and __bold__ text")
    assert plain(pieces) == "See NICE <https://nice.org.uk> and code and bold text"


def test_wrap_never_breaks_a_word_and_prefixes_lines() -> None:
    lines = wrap([("alpha beta gamma delta", ())], 14, Styler(), first="> ", rest="  ")
    assert lines == ["> alpha beta", "  gamma delta"]


def test_sort_cards_puts_critical_first_and_is_stable() -> None:
    cards = [{"indicator": "info", "summary": "i1"}, {"indicator": "critical", "summary": "c"},
             {"indicator": "warning", "summary": "w"}, {"indicator": "info", "summary": "i2"}]
    assert [c["summary"] for c in sort_cards(cards)] == ["c", "w", "i1", "i2"]


def test_render_response_numbers_sorted_cards_and_notes_the_extension() -> None:
    body = {"cards": [card("info"), card("critical")], "extension": {"org.example.assessment": {}}}
    text = render_response(body, width=100)
    assert text.index("1/2 [CRITICAL]") < text.index("2/2 [INFO]")
    assert "extension org.example.assessment" in text and text.endswith("\n")


def test_render_response_without_cards_says_so() -> None:
    assert "No cards" in render_response({"cards": []}, width=80)


@pytest.mark.parametrize(
    ("body", "expected"),
    (
        ({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "diagnostics": "labs missing",
                                                          "expression": ["prefetch.labs"]}]},
         ["error: labs missing [prefetch.labs]"]),
        ({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}, ["error: login"]),
        ({"cards": []}, []),
        ("not json", []),
    ),
    ids=["diagnostics-and-expression", "code-only", "not-an-outcome", "not-an-object"],
)
def test_outcome_lines(body: Any, expected: list[str]) -> None:
    assert outcome_lines(body) == expected
