"""Terminal rendering of a CDS Hooks response: cards as the Sandbox would show them, in plain text or colour.

Cards are sorted by indicator (critical first) like the Sandbox's ``card-list.jsx``. Each card shows its
indicator (critical red, warning yellow, info blue), summary, source, uuid, the ``detail`` Markdown rendered a
little (headings, bold, lists, links and GFM tables kept readable, wrapped to the width), suggestions with
their uuids and labels, links, and override reasons: everything an engineer needs to send feedback.

Colour follows https://no-color.org: none when ``NO_COLOR`` is set (non-empty), when the stream is not a
terminal, or when ``TERM=dumb``. Only ANSI SGR codes are used; nothing here depends on a terminal library.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

#: Sandbox order: the most urgent card first.
INDICATOR_ORDER = {"critical": 0, "warning": 1, "info": 2}
#: SGR colour codes per indicator: red, yellow, blue.
INDICATOR_COLOURS = {"critical": "31", "warning": "33", "info": "34"}
BOLD, DIM, UNDERLINE, RESET = "1", "2", "4", "\x1b[0m"
MIN_WIDTH, DEFAULT_WIDTH = 40, 100

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$")
_RULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
#: Inline Markdown: bold, code, links; everything else is shown as written.
_INLINE = re.compile(r"\*\*(?P<b1>.+?)\*\*|__(?P<b2>.+?)__|`(?P<code>[^`]+)`|\[(?P<label>[^\]]+)\]\((?P<url>[^)\s]+)\)")


def use_colour(stream: TextIO, environ: Mapping[str, str] | None = None, mode: str = "auto") -> bool:
    """Whether to colour output to ``stream``: ``mode`` always/never, else a TTY without NO_COLOR or TERM=dumb."""
    if mode in ("always", "never"):
        return mode == "always"
    environ = os.environ if environ is None else environ
    if environ.get("NO_COLOR") or environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def terminal_width(fallback: int = DEFAULT_WIDTH) -> int:
    """The terminal's width (``COLUMNS`` wins), at least ``MIN_WIDTH``."""
    return max(MIN_WIDTH, shutil.get_terminal_size((fallback, 24)).columns)


@dataclass(frozen=True)
class Styler:
    """Wraps text in ANSI SGR codes, or leaves it alone when colour is off."""

    colour: bool = False

    def __call__(self, text: str, *codes: str) -> str:
        """``text`` in the SGR ``codes`` (e.g. BOLD, "31"), or unchanged."""
        if not self.colour or not codes or not text:
            return text
        return f"\x1b[{';'.join(codes)}m{text}{RESET}"


# A piece of inline text and its SGR codes.
Piece = tuple[str, tuple[str, ...]]


def inline(text: str) -> list[Piece]:
    """Split inline Markdown into styled pieces: **bold**, `code`, [label](url) as "label <url>"."""
    pieces: list[Piece] = []
    position = 0
    for match in _INLINE.finditer(text):
        if match.start() > position:
            pieces.append((text[position:match.start()], ()))
        if match.group("label") is not None:
            pieces += [(match.group("label"), (UNDERLINE,)), (f" <{match.group('url')}>", (DIM,))]
        elif match.group("code") is not None:
            pieces.append((match.group("code"), ("36",)))
        else:
            pieces.append((match.group("b1") or match.group("b2"), (BOLD,)))
        position = match.end()
    if position < len(text):
        pieces.append((text[position:], ()))
    return pieces


def plain(pieces: Sequence[Piece]) -> str:
    """The text of ``pieces`` without styles."""
    return "".join(text for text, _ in pieces)


def paint(pieces: Sequence[Piece], style: Styler, extra: tuple[str, ...] = ()) -> str:
    """``pieces`` with their styles (plus ``extra``) applied."""
    return "".join(style(text, *extra, *codes) for text, codes in pieces)


def wrap(pieces: Sequence[Piece], width: int, style: Styler, *, first: str = "", rest: str = "",
         extra: tuple[str, ...] = ()) -> list[str]:
    """Greedy word wrap of styled ``pieces`` to ``width`` columns; ``first``/``rest`` prefix the lines."""
    words: list[list[Piece]] = [[]]
    for text, codes in pieces:
        for part in re.split(r"(\s+)", text):
            if not part:
                continue
            if part.isspace():
                words.append([])
            else:
                words[-1].append((part, codes))
    lines: list[str] = []
    current: list[list[Piece]] = []
    used = 0
    room = max(10, width - len(first))
    for word in (w for w in words if w):
        size = len(plain(word))
        if current and used + 1 + size > room:
            lines.append(_join(current, style, extra))
            current, used, room = [], 0, max(10, width - len(rest))
        current.append(word)
        used += size + (1 if used else 0)
    if current:
        lines.append(_join(current, style, extra))
    return [(first if i == 0 else rest) + line for i, line in enumerate(lines)] or [first.rstrip()]


def _join(words: Sequence[Sequence[Piece]], style: Styler, extra: tuple[str, ...]) -> str:
    # The space between two words takes their style when they share it, so a bold phrase is one SGR run.
    pieces: list[Piece] = []
    for word in words:
        if pieces:
            pieces.append((" ", pieces[-1][1] if pieces[-1][1] == word[0][1] else ()))
        pieces.extend(word)
    merged: list[Piece] = []
    for text, codes in pieces:
        if merged and merged[-1][1] == codes:
            merged[-1] = (merged[-1][0] + text, codes)
        else:
            merged.append((text, codes))
    return paint(merged, style, extra)


def render_markdown(text: str, width: int, style: Styler, indent: str = "") -> list[str]:
    """GFM, a little: headings and bold in bold, bullets with hanging indents, tables aligned, the rest wrapped."""
    lines = text.replace("\r\n", "\n").split("\n")
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.extend(wrap(inline(" ".join(s.strip() for s in paragraph)), width, style, first=indent,
                            rest=indent))
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            flush()
            i += 1
            while i < len(lines) and not _FENCE.match(lines[i]):
                out.append(indent + "    " + style(lines[i], DIM))
                i += 1
        elif not line.strip():
            flush()
            if out and out[-1].strip():
                out.append("")
        elif "|" in line and i + 1 < len(lines) and _TABLE_SEPARATOR.match(lines[i + 1]):
            flush()
            rows = [line]
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                rows.append(lines[i])
                i += 1
            out.extend(render_table([_cells(row) for row in rows], width, style, indent))
            continue
        elif heading := _HEADING.match(line):
            flush()
            out.extend(wrap(inline(heading.group(2)), width, style, first=indent, rest=indent,
                            extra=(BOLD, UNDERLINE) if len(heading.group(1)) == 1 else (BOLD,)))
        elif _RULE.match(line):
            flush()
            out.append(indent + style("─" * max(10, width - len(indent)), DIM))
        elif bullet := _BULLET.match(line):
            flush()
            depth = len(bullet.group(1).expandtabs(4)) // 2
            marker = "•" if bullet.group(2) in "-*+" else bullet.group(2)
            lead = indent + "  " * depth
            out.extend(wrap(inline(bullet.group(3)), width, style, first=f"{lead}{marker} ",
                            rest=lead + " " * (len(marker) + 1)))
        elif line.lstrip().startswith(">"):
            flush()
            out.extend(wrap(inline(line.lstrip()[1:].strip()), width, style, first=indent + "│ ",
                            rest=indent + "│ ", extra=(DIM,)))
        else:
            paragraph.append(line)
        i += 1
    flush()
    while out and not out[-1].strip():
        out.pop()
    return out


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", row)]


def render_table(rows: Sequence[Sequence[str]], width: int, style: Styler, indent: str = "") -> list[str]:
    """A GFM table aligned in columns; too wide for ``width``, each row becomes "Header: value" lines."""
    header, body = list(rows[0]), [list(r) + [""] * (len(rows[0]) - len(r)) for r in rows[1:]]
    cells = [[inline(c) for c in r[:len(header)]] for r in [header, *body]]
    widths = [max(len(plain(row[col])) for row in cells) for col in range(len(header))]
    gap = "  "
    if len(indent) + sum(widths) + len(gap) * (len(widths) - 1) <= width:
        def line(row: Sequence[list[Piece]], extra: tuple[str, ...] = ()) -> str:
            padded = [paint(cell, style, extra) + " " * (widths[n] - len(plain(cell))) for n, cell in enumerate(row)]
            return (indent + gap.join(padded)).rstrip()
        rule = indent + gap.join(style("─" * w, DIM) for w in widths)
        return [line(cells[0], (BOLD,)), rule, *(line(row) for row in cells[1:])]
    out: list[str] = []
    for row in cells[1:]:
        for number, cell in enumerate(row):
            label = plain(cells[0][number]) or f"column {number + 1}"
            lead = f"{indent}{'• ' if number == 0 else '  '}"
            out.extend(wrap([(f"{label}:", (BOLD,)), (" ", ()), *cell], width, style, first=lead,
                            rest=indent + "    "))
    return out


def sort_cards(cards: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Sandbox's order: critical, warning, info (stable within an indicator)."""
    return sorted(cards, key=lambda card: INDICATOR_ORDER.get(str(card.get("indicator")), len(INDICATOR_ORDER)))


def render_card(card: Mapping[str, Any], style: Styler, width: int, *, number: int = 1, total: int = 1) -> list[str]:
    """One card: indicator badge and summary, source and uuid, detail, suggestions, links, override reasons."""
    indicator = str(card.get("indicator", "?"))
    colour = INDICATOR_COLOURS.get(indicator, "")
    badge = f"[{indicator.upper()}]"
    lead = f"{number}/{total} " if total > 1 else ""
    out = wrap([(lead, (DIM,)), (badge, (BOLD, colour) if colour else (BOLD,)), (" ", ()),
                (str(card.get("summary", "")), (BOLD,))], width, style, rest=" " * (len(lead) + len(badge) + 1))
    pad = "    "
    source = card.get("source") or {}
    about = [f"source: {source.get('label', '?')}"]
    if source.get("url"):
        about.append(f"<{source['url']}>")
    topic = source.get("topic") or {}
    if topic.get("code"):
        about.append(f"· topic {topic['code']}")
    out += wrap([(" ".join(about), (DIM,))], width, style, first=pad, rest=pad)
    out.append(pad + style(f"card uuid: {card['uuid']}" if card.get("uuid") else
                           "card uuid: (none; feedback is not possible for this card)", DIM))
    if card.get("detail"):
        out += ["", *render_markdown(str(card["detail"]), width, style, indent=pad)]
    suggestions = card.get("suggestions") or []
    if suggestions:
        behaviour = f" (select {card['selectionBehavior']})" if card.get("selectionBehavior") else ""
        out += ["", pad + style(f"Suggestions{behaviour}:", BOLD)]
        for suggestion in suggestions:
            star = "★ " if suggestion.get("isRecommended") else "- "
            out += wrap([(str(suggestion.get("label", "")), ())], width, style, first=pad + "  " + star,
                        rest=pad + "    ")
            out.append(pad + "    " + style(f"uuid: {suggestion.get('uuid', '(none)')}", DIM))
            for action in suggestion.get("actions") or []:
                what = f"{action.get('type', '?')} {(action.get('resource') or {}).get('resourceType', '')}".strip()
                text = f"{what}: {action['description']}" if action.get("description") else what
                out += wrap([(text, (DIM,))], width, style, first=pad + "    ", rest=pad + "      ")
    links = card.get("links") or []
    if links:
        out += ["", pad + style("Links:", BOLD)]
        for link in links:
            kind = " (SMART app)" if link.get("type") == "smart" else ""
            out += wrap([(f"{link.get('label', '')}{kind}", ()), (f" <{link.get('url', '')}>", (DIM,))], width,
                        style, first=pad + "  - ", rest=pad + "    ")
    reasons = card.get("overrideReasons") or []
    if reasons:
        systems = {reason.get("system") for reason in reasons}
        out += ["", pad + style("Override reasons (feedback --override --reason-system S --reason-code C):", BOLD)]
        if len(systems) == 1:
            out += wrap([(f"system: {systems.pop()}", (DIM,))], width, style, first=pad + "  ", rest=pad + "    ")
        for reason in reasons:
            where = [(f" (system {reason.get('system')})", (DIM,))] if len(systems) > 1 else []
            out += wrap([(f"{reason.get('code', '?')}:", ("36",)), (f" {reason.get('display', '')}", ()), *where],
                        width, style, first=pad + "  - ", rest=pad + "    ")
    return out


def render_response(body: Mapping[str, Any], *, style: Styler | None = None, width: int | None = None) -> str:
    """A CDS Hooks response (``cards``, ``systemActions``, ``extension``) as terminal text, ending in a newline."""
    style = style or Styler()
    width = width or terminal_width()
    cards = sort_cards(body.get("cards") or [])
    out: list[str] = []
    if not cards:
        out.append(style("No cards: the service has no recommendations for this patient.", BOLD))
    for number, card in enumerate(cards, start=1):
        if number > 1:
            out += ["", style("─" * width, DIM), ""]
        out += render_card(card, style, width, number=number, total=len(cards))
    notes = []
    if body.get("systemActions"):
        notes.append(f"{len(body['systemActions'])} system action(s)")
    if body.get("extension"):
        notes.append("extension " + ", ".join(sorted(body["extension"])))
    if notes:
        out += ["", style(f"Also in the response: {'; '.join(notes)} (see --json).", DIM)]
    return "\n".join(out) + "\n"


def outcome_lines(body: Any) -> list[str]:
    """The diagnostics of an OperationOutcome, one line per issue (with its expression), or []."""
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return []
    lines = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        where = ", ".join(issue.get("expression") or [])
        text = str(issue.get("diagnostics") or issue.get("code") or "(no diagnostics)")
        lines.append(f"{issue.get('severity', 'error')}: {text}" + (f" [{where}]" if where else ""))
    return lines
