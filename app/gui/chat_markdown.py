"""Chat text to the HTML a QLabel shows: Markdown with line breaks kept, and fenced code
highlighted by Pygments under a header with the language and a "Copy" link.

Markdown is parsed by markdown-it-py (CommonMark, tables, strikethrough; raw HTML is shown
as text, never interpreted) with ``breaks`` on, so a single line break stays a line break
(a haiku keeps its lines). A streaming answer is re-rendered every 50 ms, so the text is
cut into blocks at blank lines outside code fences and each block's HTML is cached: while
an answer grows only its last block is parsed again. An unclosed fence runs to the end
(the block renders as code while it streams).

A run of characters with no space in it (a URL, a path, a hash) gets a zero-width space
about every ``BREAK_EVERY`` characters once it is ``LONG_RUN`` long (only between characters
of the alphabetic scripts, never before a combining mark): a QLabel wraps only at word
boundaries, so such a run wider than the transcript was cut off at its edge. (The label's
copy takes them out again: ``strip_breaks``.)

Code colours come from a Pygments style picked for the palette (light or dark), drawn on
the style's own background, so they read in either theme. Each code block's "Copy" link is
``copy:N`` (N counts the answer's code blocks from 0); ``Rendered.code[N]`` is its text.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.lexers.special import TextLexer
from pygments.styles import get_style_by_name
from pygments.token import Token
from pygments.util import ClassNotFound

COPY_SCHEME = "copy"
LIGHT_STYLE = "default"
DARK_STYLE = "github-dark"

#: A zero-width space: where a long run may wrap (U+200B, a line-break opportunity in Qt).
ZWSP = "\u200b"
LONG_RUN = 24  # a run this many characters long gets break points ...
BREAK_EVERY = 12  # ... one after each this many characters

_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
_TAG = re.compile(r"(<[^>]*>)")
_RUN = re.compile(r"(?:&#?\w+;|[^\s&])+")  # an entity counts as the one character it shows
_CHAR = re.compile(r"&#?\w+;|[^\s&]")
_COPY_HREF = re.compile(rf'href="{COPY_SCHEME}:(\d+)"')


@dataclass(frozen=True, slots=True)
class Rendered:
    """The HTML of a message and the exact text of each of its code blocks."""

    html: str
    code: tuple[str, ...]


def render_markdown(text: str, dark: bool = False) -> Rendered:
    """HTML for ``text`` (see the module docstring); ``dark`` picks the code colours."""
    parts, code = [], []
    for block in split_blocks(text):
        block_html, block_code = _render_block(block, dark)
        if block_code:
            offset = len(code)
            block_html = _COPY_HREF.sub(
                lambda m: f'href="{COPY_SCHEME}:{offset + int(m[1])}"', block_html)
            code.extend(block_code)
        parts.append(block_html)
    return Rendered("".join(parts).rstrip(), tuple(code))


def code_blocks(text: str) -> tuple[str, ...]:
    """The exact text of each code block of ``text`` (``Rendered.code``), without
    highlighting or laying anything out."""
    return tuple(t.content[:-1] if t.content.endswith("\n") else t.content
                 for block in split_blocks(text) for t in _markdown().parse(block)
                 if t.type in ("fence", "code_block"))


def split_blocks(text: str) -> list[str]:
    """``text`` cut at blank lines that end a block: outside code fences, and only where
    the next line starts at the margin (an indented line may continue a list item)."""
    blocks: list[str] = []
    current: list[str] = []
    fence: str | None = None  # the opening fence's marker while inside a code block
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m[1]
        elif fence is not None and m and m[1][0] == fence[0] and len(m[1]) >= len(fence) \
                and not line.strip().strip(fence[0]):
            fence = None
        current.append(line)
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if fence is None and not line.strip() and nxt.strip() and not nxt[0].isspace():
            blocks.append("\n".join(current) + "\n")
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


@lru_cache(maxsize=1024)
def _render_block(block: str, dark: bool) -> tuple[str, tuple[str, ...]]:
    env: dict = {"code": [], "dark": dark}
    out = _markdown().render(block, env)
    out = out.replace("<table>", '<table border="1" cellspacing="0" cellpadding="4">')
    # Inline code (fences have their own rule): a tint behind it, as in any Markdown viewer.
    # (Qt ignores styles on <code> itself, so a span inside carries them.)
    out = out.replace("<code>", '<code><span style="font-family:monospace; background-color:'
                      f'{_colours(dark)["inline_bg"]}">').replace("</code>", "</span></code>")
    return breakable(out), tuple(env["code"])


def breakable(markup: str) -> str:
    """``markup`` with a ``ZWSP`` every ``BREAK_EVERY`` characters of each run of at least
    ``LONG_RUN`` characters without a space, in its text only (tags and their attributes,
    a link's address, stay as they are)."""
    parts = _TAG.split(markup)
    for i in range(0, len(parts), 2):  # the text between the tags
        if len(parts[i]) >= LONG_RUN:
            parts[i] = _RUN.sub(_break_run, parts[i])
    return "".join(parts)


def _break_run(m: re.Match) -> str:
    run = m[0]
    if len(run) < LONG_RUN:
        return run
    chars = _CHAR.findall(run)
    if len(chars) < LONG_RUN:
        return run
    out, since = [chars[0]], 1
    for prev, char in zip(chars, chars[1:]):
        if since >= BREAK_EVERY and _breaks_between(prev, char):
            out.append(ZWSP)
            since = 0
        out.append(char)
        since += 1
    return "".join(out)


def _breaks_between(a: str, b: str) -> bool:
    """Whether a break point may go between two characters (an entity counts as one): only
    between letters, digits and signs of the alphabetic scripts (Latin to Armenian), never
    before a combining mark. Scripts written without spaces (Thai, CJK) Qt wraps by itself,
    and a zero-width space inside an emoji sequence would split it."""
    return _plain(a) and _plain(b) and not unicodedata.category(b[0]).startswith("M")


def _plain(char: str) -> bool:
    return char[0] == "&" or ord(char) < 0x0590


def strip_breaks(text: str) -> str:
    """Text copied from the rendered HTML without the break points ``breakable`` added."""
    return text.replace(ZWSP, "")


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"breaks": True, "html": False}).enable(["table", "strikethrough"])
    md.add_render_rule("fence", _render_fence)
    md.add_render_rule("code_block", _render_fence)
    return md


def _render_fence(self, tokens, idx, options, env) -> str:
    token = tokens[idx]
    lang = token.info.strip().split(maxsplit=1)[0] if token.info.strip() else ""
    code = token.content
    number = len(env["code"])
    env["code"].append(code[:-1] if code.endswith("\n") else code)
    return code_block_html(code, lang, number, env["dark"])


def code_block_html(code: str, lang: str, number: int, dark: bool) -> str:
    """One code block: a header (language, Copy link) over the highlighted code."""
    colours = _colours(dark)
    body = highlight(code, _lexer(lang), _formatter(dark)).rstrip("\n")
    label = html.escape(lang) if lang else "code"
    return (
        f'<table width="100%" cellspacing="0" cellpadding="6" bgcolor="{colours["bg"]}">'
        f'<tr><td style="color:{colours["muted"]}">{label}</td>'
        f'<td align="right"><a href="{COPY_SCHEME}:{number}" style="color:{colours["link"]}">'
        f'Copy</a></td></tr>'
        f'<tr><td colspan="2"><pre style="white-space:pre-wrap; color:{colours["fg"]}">{body}</pre>'
        f'</td></tr></table>\n'
    )


def _lexer(lang: str):
    if lang:
        try:
            return get_lexer_by_name(lang, stripnl=False, ensurenl=False)
        except ClassNotFound:
            pass
    return TextLexer(stripnl=False, ensurenl=False)


@lru_cache(maxsize=2)
def _formatter(dark: bool) -> HtmlFormatter:
    # Inline styles (Qt's rich text has no style sheets); no wrapper: our <pre> is the box.
    return HtmlFormatter(style=DARK_STYLE if dark else LIGHT_STYLE, noclasses=True, nowrap=True)


@lru_cache(maxsize=2)
def _colours(dark: bool) -> dict[str, str]:
    style = get_style_by_name(DARK_STYLE if dark else LIGHT_STYLE)
    fg = style.style_for_token(Token.Text)["color"] or ("e6edf3" if dark else "1f2328")
    return {"bg": style.background_color, "fg": f"#{fg}",
            "muted": "#8b949e" if dark else "#6e7781",
            "link": "#58a6ff" if dark else "#0969da",
            "inline_bg": "#343942" if dark else "#eaeef2"}
