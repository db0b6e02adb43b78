"""The output CHECKLIST.md quotes: the fenced blocks after `<!-- checklist-output: NAME -->` (the whole output of a
command) or `<!-- checklist-output: NAME excerpt -->` (some of its lines, in order, and its last line), and the
comparison of a command's real output with them."""

from __future__ import annotations

import re

_OUTPUT = re.compile(r"^\s*<!-- checklist-output: (\S+)( excerpt)? -->\s*$")
# what differs from run to run however right the figures are: timings and rates
_VARYING = [(re.compile(r"\b\d[\d,.]* ms\b"), "N ms"), (re.compile(r"\bin=\S+ out=\S+"), "in=R out=R")]


def quoted_outputs(text: str) -> dict[str, tuple[list[str], bool]]:
    """NAME -> (the lines of the fenced block after its marker, without the block's indentation; an excerpt?)."""
    lines, found = text.splitlines(), {}
    for i, line in enumerate(lines):
        m = _OUTPUT.match(line)
        if not m:
            continue
        rest = lines[i + 1:]
        assert rest and rest[0].strip().startswith("```"), f"checklist-output {m.group(1)}: no code block after it"
        end = next(j for j in range(1, len(rest)) if rest[j].strip().startswith("```"))
        indent = len(rest[0]) - len(rest[0].lstrip())
        assert m.group(1) not in found, f"checklist-output {m.group(1)} twice"
        found[m.group(1)] = ([x[indent:] for x in rest[1:end]], bool(m.group(2)))
    return found


def _normal(line: str) -> str:
    for pattern, same in _VARYING:
        line = pattern.sub(same, line)
    return " ".join(line.split())  # alignment (a centred title, a fix's indentation) is not a figure


def mismatch(quoted: list[str], excerpt: bool, output: str) -> str | None:
    """Why ``output`` is not what ``quoted`` says (None when it is): the whole output line by line, or for an
    excerpt every quoted line in the output in that order and the last lines equal."""
    want = [_normal(x) for x in quoted if x.strip()]
    got = [_normal(x) for x in output.splitlines() if x.strip()]
    if not excerpt:
        if want != got:
            pairs = enumerate(zip(want, got, strict=False))
            diff = next((i for i, (w, g) in pairs if w != g), min(len(want), len(got)))
            return (f"line {diff + 1}: quoted {want[diff] if diff < len(want) else '(nothing)'!r}, printed "
                    f"{got[diff] if diff < len(got) else '(nothing)'!r}")
        return None
    lines = iter(got)
    missing = [w for w in want if w not in lines]  # `in` on the iterator: in order, each line used once
    if missing:
        return f"quoted line(s) not printed (in this order): {missing}"
    if not got or got[-1] != want[-1]:
        return f"last line: quoted {want[-1]!r}, printed {got[-1] if got else '(nothing)'!r}"
    return None
