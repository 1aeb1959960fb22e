"""Slurm hostlist expressions (`gpu[01-04,07],cpu3`, `rack[1-2]-n[1-2]`) expanded in Slurm's order.

Used when `scontrol show hostnames` is not available on a node. Rules, as Slurm applies them:
  - top-level commas separate host expressions; commas inside brackets separate ranges;
  - a range `lo-hi` keeps the zero padding of `lo` (`[08-10]` -> 08, 09, 10; `[8-10]` -> 8, 9, 10);
  - several bracket groups in one expression expand as a cartesian product, leftmost slowest.
"""

from __future__ import annotations

import itertools
import re


class HostlistError(ValueError):
    """A Slurm hostlist that cannot be parsed."""
    pass


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(expression: str) -> list[str]:
    """Host names of a Slurm hostlist expression, in order (duplicates kept, as Slurm keeps them)."""
    expression = expression.strip()
    if not expression:
        raise HostlistError("empty hostlist")
    hosts: list[str] = []
    for item in _split_top_level(expression):
        hosts.extend(_expand_item(item, expression))
    return hosts


def _split_top_level(expression: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expression):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"hostlist {expression!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"hostlist {expression!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(expression[start:i])
            start = i + 1
    if depth != 0:
        raise HostlistError(f"hostlist {expression!r}: '[' is not closed")
    items.append(expression[start:])
    for item in items:
        if not item.strip():
            raise HostlistError(f"hostlist {expression!r}: empty host name between commas")
    return [item.strip() for item in items]


def _expand_item(item: str, expression: str) -> list[str]:
    # Alternating literal text and bracket bodies: "rack", "1-2", "-n", "1-2", "".
    parts = re.split(r"\[([^\]]*)\]", item)
    choices: list[list[str]] = []
    for index, part in enumerate(parts):
        choices.append(_expand_ranges(part, expression) if index % 2 else [part])
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_ranges(body: str, expression: str) -> list[str]:
    values: list[str] = []
    for piece in body.split(","):
        match = _RANGE.match(piece.strip())
        if not match:
            raise HostlistError(f"hostlist {expression!r}: bad range {piece!r} (expected N or N-M)")
        lo_text, hi_text = match.group(1), match.group(2)
        if hi_text is None:
            values.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise HostlistError(f"hostlist {expression!r}: range {piece!r} ends before it starts")
        values.extend(str(n).zfill(len(lo_text)) for n in range(lo, hi + 1))
    return values
