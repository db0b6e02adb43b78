"""`cli.common.shown`, the one escape for outside text in rich output, is total: any text renders through the CLI's
own consoles as exactly its visible escaped form (control characters as escapes), with no style, link or emoji
taken from it, and never raises MarkupError."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from myshop_ops.adapters.config import redact
from myshop_ops.base.printable import printable
from myshop_ops.cli.common import console, err_console, shown

HOSTILE = ["[/x]", "[/]", "[link=https://evil.example]click[/link]", "[bold red]x", "\\[b]", "\\\\[b]", "x\\",
           "[", "]", ":smile:", ":red_heart-emoji:", "\x1b[2J", "\x9b31m", "\n", "\u202e", "[@click=app.quit]",
           "[#ff0000 on white]", "a\\[/x]"]
texts = st.lists(st.one_of(st.sampled_from(HOSTILE), st.text()), max_size=6).map("".join)


def visible(spans) -> list:
    return [s for s in spans if s.end > s.start]


def rendered(value: str):
    """``value`` through shown() on each CLI console: alone, and between tags of the caller's (whose styles must
    cover exactly the value)."""
    out = []
    for c in (console, err_console):
        text = c.render_str(f"{shown(value)}", highlight=False)
        framed = c.render_str(f"[bold]{shown(value)}[/bold]\\[x] [red]{shown(value)}[/]", highlight=False)
        n = len(text.plain)
        assert framed.plain == f"{text.plain}[x] {text.plain}"
        assert [(s.start, s.end, str(s.style)) for s in visible(framed.spans)] == [
            x for x in [(0, n, "bold"), (n + 4, 2 * n + 4, "red")] if x[1] > x[0]]
        out.append(text)
        with c.capture() as captured:
            c.print(shown(value), highlight=False, soft_wrap=True, end="")
        assert captured.get() == text.plain
    return out


def test_a_duplicate_product_id_of_markup_renders_as_written():
    """The attack: a product_id `[/x]` in setup-indexes' refusal crashed it with MarkupError."""
    for value in ("[/x]", "[link=https://evil.example]x[/link]", ":smile:"):
        for text in rendered(value):
            assert text.plain == value and not visible(text.spans)


@settings(max_examples=400, deadline=None)
@given(value=texts)
@example(value="x\\[")  # rich takes one backslash from before a "[" that opens no tag: it showed "x["
@example(value="a\\\\[b")
@example(value="[a\\[b]")
def test_any_text_renders_as_its_escaped_form(value):
    for text in rendered(value):
        assert text.plain == printable(redact(value))  # redact: secrets and URL passwords masked
        assert not visible(text.spans)  # no style, link or action came from the text


def test_non_text_values_are_shown_as_text():
    assert [t.plain for t in rendered(None)] == ["None", "None"]  # type: ignore[arg-type]
    assert shown(42) == "42" and shown(b"[/x]") == "b'\\[/x]'"
