"""Draw the docs' state diagrams as SVG from transition tables.

Run from the repository root (``docs/hooks.py`` also runs it before every docs build)::

    .venv/bin/python docs/gen_state_diagram.py            # write docs/img/*.svg
    .venv/bin/python docs/gen_state_diagram.py --check    # exit 1 if a file is stale

Three pictures:

* ``tcp_close_states.svg``: the TCP states of the active and the passive closer
  (RFC 9293 section 3.3.2, Linux ``include/net/tcp_states.h``), from
  :data:`TCP_TRANSITIONS` below.
* ``tcp_close_sequence.svg``: the four segments of a close on a time line, from
  :data:`SEQUENCE` below.
* ``close_plan.svg``: tcpclose's own close plan, from ``tcpclose._plan.TRANSITIONS``,
  ``EFFECTS`` (what a transition records: ``event / fin-sent``), ``AUTOMATIC`` (the
  moves the plan makes by itself: dashed, ``event [condition]``) and ``ENTRY`` -- the
  tables the sync and asyncio drivers run, so the picture cannot drift from the code.
  Graphviz's ``dot`` (Debian package ``graphviz``) lays it out, so a phase or event
  the plan gains is placed without overlaps; without ``dot`` the committed file is
  kept and the script says so on stderr.

The first two are drawn here in pure Python (their layout is part of what they teach).

The output is deterministic: the same tables give byte-identical files, so the
files are committed and a rebuild only rewrites what changed.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent
IMG_DIR = HERE / "img"

Point = tuple[float, float]

# -- styles ---------------------------------------------------------------------------------

SANS = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace"
INK = "#1f2430"
MUTED = "#5c6370"

#: Edge styles: stroke colour, dash pattern, label colour.
EDGE_STYLES: Mapping[str, tuple[str, str, str]] = {
    "active": ("#2457c5", "", "#1b3f8f"),
    "passive": ("#1d8a4e", "", "#14663a"),
    "simultaneous": ("#7a808a", "", "#4b5059"),
    "reset": ("#c62828", "6 4", "#a01f1f"),
    "timer": ("#b26a00", "3 4", "#8a5200"),
    "plan": ("#3b4252", "", "#2e3440"),
    "fallback": ("#8e44ad", "", "#6c3483"),
    "entry": ("#7a808a", "", "#4b5059"),
}

#: Node styles: fill, stroke.
NODE_STYLES: Mapping[str, tuple[str, str]] = {
    "state": ("#eef2fb", "#2457c5"),
    "active": ("#e8effd", "#2457c5"),
    "passive": ("#e6f5ec", "#1d8a4e"),
    "simultaneous": ("#f1f2f4", "#7a808a"),
    "held": ("#fff3df", "#b26a00"),
    "terminal": ("#f1f2f4", "#3b4252"),
    "entry": ("#ffffff", "#7a808a"),
    "note": ("#fffbea", "#d8c37a"),
    "phase": ("#eef2fb", "#3b4252"),
    "abort": ("#fdecec", "#c62828"),
}


def fmt(value: float) -> str:
    """Numbers as SVG wants them: short, and identical from run to run."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def text_width(text: str, size: float, mono: bool = False) -> float:
    """A rough width estimate (no font metrics here); good enough to place labels."""
    return len(text) * size * (0.62 if mono else 0.56)


# -- the drawing model ----------------------------------------------------------------------


@dataclass
class Node:
    key: str
    label: str
    x: float
    y: float
    w: float = 150.0
    h: float = 44.0
    style: str = "state"
    sublabel: str = ""
    mono: bool = True
    rounded: float = 10.0

    def boundary_towards(self, p: Point) -> Point:
        """Where the segment from this node's centre towards ``p`` leaves the box."""
        dx, dy = p[0] - self.x, p[1] - self.y
        if dx == 0 and dy == 0:
            return (self.x, self.y)
        sx = (self.w / 2) / abs(dx) if dx else math.inf
        sy = (self.h / 2) / abs(dy) if dy else math.inf
        s = min(sx, sy)
        return (self.x + dx * s, self.y + dy * s)


@dataclass
class Edge:
    src: str
    dst: str
    label: str = ""
    style: str = "plan"
    #: Intermediate points (absolute); the ends are clipped to the boxes.
    via: Sequence[Point] = ()
    #: Where the label's centre goes; default: middle of the longest segment.
    label_at: Point | None = None
    #: Text anchor of the label: "middle", "start" or "end".
    anchor: str = "middle"
    #: For an edge from a node to itself: which side the loop sits on.
    loop_side: str = "right"
    #: Attach points: override the clipped end points.
    start: Point | None = None
    end: Point | None = None


@dataclass
class Diagram:
    width: float
    height: float
    title: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    texts: list[tuple[float, float, str, str, float, str]] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    def node(self, node: Node) -> None:
        self.nodes[node.key] = node

    def text(
        self,
        x: float,
        y: float,
        text: str,
        *,
        anchor: str = "middle",
        size: float = 12.0,
        color: str = MUTED,
    ) -> None:
        self.texts.append((x, y, text, anchor, size, color))

    # -- rendering --------------------------------------------------------------------------

    def render(self) -> str:
        out: list[str] = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{fmt(self.width)}" '
            f'height="{fmt(self.height)}" viewBox="0 0 {fmt(self.width)} {fmt(self.height)}" '
            f'role="img" aria-label="{escape(self.title)}">',
            f"<title>{escape(self.title)}</title>",
            "<!-- generated by docs/gen_state_diagram.py; edit the tables there -->",
            "<defs>",
        ]
        for name, (stroke, _dash, _ink) in sorted(EDGE_STYLES.items()):
            out.append(
                f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" '
                'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
                f'<path d="M0,0 L10,5 L0,10 z" fill="{stroke}"/></marker>'
            )
        out.append("</defs>")
        out.append(
            f'<rect x="0" y="0" width="{fmt(self.width)}" height="{fmt(self.height)}" '
            'fill="#ffffff" rx="6"/>'
        )
        out.extend(self.extra)
        labels: list[str] = []
        for edge in self.edges:
            path, label = self._edge(edge)
            out.append(path)
            labels.extend(label)
        for node in self.nodes.values():
            out.extend(self._node(node))
        out.extend(labels)  # labels last: their halo covers lines, never boxes
        for x, y, text, anchor, size, color in self.texts:
            out.append(_text(x, y, text, anchor=anchor, size=size, color=color))
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def _node(self, node: Node) -> list[str]:
        fill, stroke = NODE_STYLES[node.style]
        x0, y0 = node.x - node.w / 2, node.y - node.h / 2
        parts = [
            f'<rect x="{fmt(x0)}" y="{fmt(y0)}" width="{fmt(node.w)}" height="{fmt(node.h)}" '
            f'rx="{fmt(node.rounded)}" fill="{fill}" stroke="{stroke}" stroke-width="1.6"/>'
        ]
        family = MONO if node.mono else SANS
        if node.sublabel:
            parts.append(
                _text(
                    node.x, node.y - 3, node.label, size=13, weight="bold", family=family, color=INK
                )
            )
            parts.append(_text(node.x, node.y + 13, node.sublabel, size=10.5, color=MUTED))
        else:
            parts.append(
                _text(
                    node.x,
                    node.y + 4.5,
                    node.label,
                    size=13,
                    weight="bold",
                    family=family,
                    color=INK,
                )
            )
        return parts

    def _edge(self, edge: Edge) -> tuple[str, list[str]]:
        stroke, dash, ink = EDGE_STYLES[edge.style]
        src, dst = self.nodes[edge.src], self.nodes[edge.dst]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        if edge.src == edge.dst:
            points = _self_loop(src, edge.loop_side)
            d = (
                f"M{fmt(points[0][0])},{fmt(points[0][1])} "
                f"C{fmt(points[1][0])},{fmt(points[1][1])} "
                f"{fmt(points[2][0])},{fmt(points[2][1])} "
                f"{fmt(points[3][0])},{fmt(points[3][1])}"
            )
            lx = points[1][0] + (8 if edge.loop_side == "right" else -8)  # (top: label_at)
            label_at = edge.label_at or (lx, src.y + 4)
            anchor = "start" if edge.loop_side == "right" else "end"
            path = (
                f'<path d="{d}" fill="none" stroke="{stroke}" stroke-width="1.6"{dash_attr} '
                f'marker-end="url(#arrow-{edge.style})"/>'
            )
            return path, _label(label_at, edge.label, anchor, ink)
        inner = list(edge.via)
        first = edge.start or src.boundary_towards(inner[0] if inner else (dst.x, dst.y))
        last = edge.end or dst.boundary_towards(inner[-1] if inner else (src.x, src.y))
        points = [first, *inner, last]
        d = "M" + " L".join(f"{fmt(x)},{fmt(y)}" for x, y in points)
        path = (
            f'<path d="{d}" fill="none" stroke="{stroke}" stroke-width="1.6"{dash_attr} '
            f'stroke-linejoin="round" marker-end="url(#arrow-{edge.style})"/>'
        )
        if not edge.label:
            return path, []
        if edge.label_at is not None:
            at = edge.label_at
        else:
            seg = max(
                range(len(points) - 1),
                key=lambda i: math.dist(points[i], points[i + 1]),
            )
            (ax, ay), (bx, by) = points[seg], points[seg + 1]
            at = ((ax + bx) / 2, (ay + by) / 2)
        return path, _label(at, edge.label, edge.anchor, ink)


def _text(
    x: float,
    y: float,
    text: str,
    *,
    anchor: str = "middle",
    size: float = 12.0,
    weight: str = "normal",
    family: str = SANS,
    color: str = INK,
    halo: bool = False,
) -> str:
    halo_attr = (
        ' paint-order="stroke" stroke="#ffffff" stroke-width="4" stroke-linejoin="round"'
        if halo
        else ""
    )
    lines = text.split("\n")
    attrs = (
        f'text-anchor="{anchor}" font-family="{escape(family)}" font-size="{fmt(size)}" '
        f'font-weight="{weight}" fill="{color}"{halo_attr}'
    )
    if len(lines) == 1:
        return f'<text x="{fmt(x)}" y="{fmt(y)}" {attrs}>{escape(text)}</text>'
    spans = "".join(
        f'<tspan x="{fmt(x)}" dy="{fmt(0 if i == 0 else size * 1.2)}">{escape(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    return f'<text x="{fmt(x)}" y="{fmt(y)}" {attrs}>{spans}</text>'


def _label(at: Point, text: str, anchor: str, color: str) -> list[str]:
    if not text:
        return []
    lines = text.split("\n")
    size = 11.5
    top = at[1] - (len(lines) - 1) * size * 1.2 / 2 + size * 0.35
    return [_text(at[0], top, text, anchor=anchor, size=size, color=color, halo=True)]


def _self_loop(node: Node, side: str) -> list[Point]:
    if side == "top":  # (over the right half of the box)
        top, x = node.y - node.h / 2, node.x + node.w / 4
        return [(x - 8, top), (x - 30, top - 34), (x + 30, top - 34), (x + 8, top - 2)]
    sign = 1 if side == "right" else -1
    edge_x = node.x + sign * node.w / 2
    return [
        (edge_x, node.y - 8),
        (edge_x + sign * 42, node.y - 26),
        (edge_x + sign * 42, node.y + 26),
        (edge_x + sign * 2, node.y + 8),
    ]


def wrap_events(events: Iterable[str], width: int = 24) -> str:
    """Event names joined with ' · ', wrapped onto lines of at most ``width`` chars."""
    return "\n".join(textwrap.wrap(" · ".join(events), width, break_on_hyphens=False))


# -- 1. TCP close states ----------------------------------------------------------------------
#
# (from, to, event / action, who) -- RFC 9293 section 3.3.2 (figure 5), RFC 1122 4.2.2.13,
# and what Linux adds: the orphaned-FIN_WAIT2 timer (tcp_fin_timeout, net/ipv4/tcp.c) and the
# abortive close (RST) that SO_LINGER {1, 0} or unread data cause (net/ipv4/tcp.c, __tcp_close).

TCP_TRANSITIONS: Sequence[tuple[str, str, str, str]] = (
    ("ESTABLISHED", "FIN_WAIT1", "close() or\nshutdown(SHUT_WR)\n/ send FIN", "active"),
    ("FIN_WAIT1", "FIN_WAIT2", "recv ACK of our FIN", "active"),
    ("FIN_WAIT2", "TIME_WAIT", "recv FIN / send ACK", "active"),
    ("FIN_WAIT1", "CLOSING", "recv FIN\n/ send ACK", "simultaneous"),
    ("CLOSING", "TIME_WAIT", "recv ACK\nof our FIN", "simultaneous"),
    ("TIME_WAIT", "CLOSED", "2·MSL timer\nLinux: 60 s", "timer"),
    ("FIN_WAIT2", "CLOSED", "orphaned (fd closed):\ntcp_fin_timeout, 60 s", "timer"),
    ("ESTABLISHED", "CLOSE_WAIT", "recv FIN / send ACK", "passive"),
    ("CLOSE_WAIT", "LAST_ACK", "close() / send FIN", "passive"),
    ("LAST_ACK", "CLOSED", "recv ACK of our FIN", "passive"),
    (
        "ESTABLISHED",
        "CLOSED",
        "send RST (abortive):\nSO_LINGER {1, 0},\nor close() with\nunread data",
        "reset",
    ),
)

_TCP_COLUMNS = {"simultaneous": 100.0, "active": 290.0, "center": 500.0, "passive": 745.0}
_TCP_ROW = 110.0
_TCP_TOP = 92.0

#: state -> (column, row, node style)
TCP_LAYOUT: Mapping[str, tuple[str, float, str]] = {
    "ESTABLISHED": ("center", 0, "state"),
    "FIN_WAIT1": ("active", 1, "active"),
    "CLOSE_WAIT": ("passive", 1, "passive"),
    "CLOSING": ("simultaneous", 2, "simultaneous"),
    "FIN_WAIT2": ("active", 2, "active"),
    "LAST_ACK": ("passive", 2, "passive"),
    "TIME_WAIT": ("active", 3, "held"),
    "CLOSED": ("center", 4, "terminal"),
}


def tcp_close_states() -> Diagram:
    top, row = _TCP_TOP, _TCP_ROW

    def ry(r: float) -> float:
        return top + r * row

    def pos(state: str) -> Point:
        column, r, _style = TCP_LAYOUT[state]
        return _TCP_COLUMNS[column], ry(r)

    diagram = Diagram(860, ry(4) + 90, "TCP close: the active and the passive closer's states")
    for state, (_column, _row, style) in TCP_LAYOUT.items():
        x, y = pos(state)
        sub = {"TIME_WAIT": "holds the 4-tuple", "CLOSED": "no socket left"}.get(state, "")
        width = 160.0 if state == "ESTABLISHED" else 150.0
        diagram.node(Node(state, state, x, y, w=width, style=style, sublabel=sub))

    # Hand-tuned routing and label places, where a straight line would cross a box or
    # another label. Edges not listed here are drawn straight.
    fw2_x, fw2_y = pos("FIN_WAIT2")
    closed_x, closed_y = pos("CLOSED")
    tw_x, tw_y = pos("TIME_WAIT")
    la_x, la_y = pos("LAST_ACK")
    est_x, est_y = pos("ESTABLISHED")
    orphan_x = closed_x - 60
    routes: dict[tuple[str, str], dict[str, object]] = {
        ("ESTABLISHED", "FIN_WAIT1"): {"label_at": (330.0, ry(0.35)), "anchor": "end"},
        ("ESTABLISHED", "CLOSE_WAIT"): {"label_at": (680.0, ry(0.35)), "anchor": "start"},
        ("CLOSE_WAIT", "LAST_ACK"): {"label_at": (la_x - 8, ry(1.5)), "anchor": "end"},
        ("FIN_WAIT1", "FIN_WAIT2"): {"label_at": (fw2_x + 8, ry(1.5)), "anchor": "start"},
        ("FIN_WAIT2", "TIME_WAIT"): {"label_at": (fw2_x + 8, ry(2.5)), "anchor": "start"},
        ("FIN_WAIT1", "CLOSING"): {"label_at": (150.0, ry(1.42)), "anchor": "end"},
        ("CLOSING", "TIME_WAIT"): {"label_at": (150.0, ry(2.78)), "anchor": "end"},
        ("TIME_WAIT", "CLOSED"): {
            "start": (tw_x, tw_y + 22),
            "via": [(tw_x, closed_y)],
            "label_at": (tw_x + 8, ry(3.5)),
            "anchor": "start",
        },
        ("FIN_WAIT2", "CLOSED"): {
            "start": (fw2_x + 75, fw2_y + 10),
            "via": [(orphan_x, fw2_y + 10)],
            "end": (orphan_x, closed_y - 22),
            "label_at": (fw2_x + 80, fw2_y - 16),
            "anchor": "start",
        },
        ("LAST_ACK", "CLOSED"): {
            "start": (la_x, la_y + 22),
            "via": [(la_x, closed_y)],
            "end": (closed_x + 75, closed_y),
            "label_at": (la_x - 8, ry(3.55)),
            "anchor": "end",
        },
        ("ESTABLISHED", "CLOSED"): {
            "start": (est_x + 20, est_y + 22),
            "end": (est_x + 20, closed_y - 22),
            "label_at": (est_x + 30, ry(2.72)),
            "anchor": "start",
        },
    }
    for src, dst, label, who in TCP_TRANSITIONS:
        options = routes.get((src, dst), {})
        diagram.edges.append(Edge(src, dst, label, style=who, **options))  # type: ignore[arg-type]

    diagram.text(
        _TCP_COLUMNS["active"],
        30,
        "ACTIVE CLOSER: sends the first FIN",
        size=12.5,
        color=EDGE_STYLES["active"][2],
    )
    diagram.text(
        _TCP_COLUMNS["passive"] - 20,
        30,
        "PASSIVE CLOSER: receives it",
        size=12.5,
        color=EDGE_STYLES["passive"][2],
    )
    diagram.text(
        _TCP_COLUMNS["simultaneous"], ry(2) + 40, "(both sides send\nFIN at once: rare)", size=10.5
    )
    # A note on TIME_WAIT's length, with where the number comes from.
    note_x, note_y = 14.0, ry(3.55)
    diagram.extra.append(
        f'<rect x="{fmt(note_x)}" y="{fmt(note_y)}" width="200" height="62" rx="6" '
        f'fill="{NODE_STYLES["note"][0]}" stroke="{NODE_STYLES["note"][1]}"/>'
    )
    diagram.text(
        note_x + 100,
        note_y + 18,
        "TIME_WAIT lasts 2·MSL.\nLinux: TCP_TIMEWAIT_LEN = 60 s\n(include/net/tcp.h), no sysctl.",
        size=10.5,
        color=INK,
    )
    # Legend.
    legend_y = ry(4) + 66
    x = 24.0
    for style, text in (
        ("active", "active close"),
        ("passive", "passive close"),
        ("simultaneous", "simultaneous close"),
        ("timer", "timer"),
        ("reset", "reset (RST)"),
    ):
        stroke, dash, ink = EDGE_STYLES[style]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        diagram.extra.append(
            f'<line x1="{fmt(x)}" y1="{fmt(legend_y)}" x2="{fmt(x + 26)}" y2="{fmt(legend_y)}" '
            f'stroke="{stroke}" stroke-width="2"{dash_attr}/>'
        )
        diagram.text(x + 32, legend_y + 4, text, anchor="start", size=11, color=ink)
        x += 40 + text_width(text, 11) + 22
    return diagram


# -- 2. the four segments on a time line -------------------------------------------------------
#
# (time the segment leaves, sender, time it arrives, label); states are shown on each
# side from the time they are entered. Not to scale: the TIME_WAIT span is shortened.

SEQUENCE: Sequence[tuple[float, str, float, str]] = (
    (1.0, "active", 2.0, "FIN"),
    (2.0, "passive", 3.0, "ACK"),
    (4.0, "passive", 5.0, "FIN"),
    (5.0, "active", 6.0, "ACK"),
)

#: (time, side, state, note)
SEQUENCE_STATES: Sequence[tuple[float, str, str, str]] = (
    (0.0, "active", "ESTABLISHED", ""),
    (0.0, "passive", "ESTABLISHED", ""),
    (1.0, "active", "FIN_WAIT1", "app calls close()"),
    (2.0, "passive", "CLOSE_WAIT", "recv() returns b''"),
    (3.0, "active", "FIN_WAIT2", ""),
    (4.0, "passive", "LAST_ACK", "app calls close()"),
    (5.0, "active", "TIME_WAIT", ""),
    (6.0, "passive", "CLOSED", "nothing kept"),
    (8.6, "active", "CLOSED", "2·MSL later"),
)


def tcp_close_sequence() -> Diagram:
    diagram = Diagram(800, 520, "TCP close on a time line: FIN, ACK, FIN, ACK, then TIME_WAIT")
    left, right = 250.0, 510.0
    t0, step = 62.0, 46.0

    def y(t: float) -> float:
        return t0 + t * step

    end_y = y(9.2)
    for x, title, style in (
        (left, "active closer", "active"),
        (right, "passive closer", "passive"),
    ):
        diagram.extra.append(
            f'<line x1="{fmt(x)}" y1="{fmt(t0 - 14)}" x2="{fmt(x)}" y2="{fmt(end_y)}" '
            f'stroke="{MUTED}" stroke-width="1.2"/>'
        )
        diagram.text(x, 28, title.upper(), size=12.5, color=EDGE_STYLES[style][2])
    for sent, who, arrived, label in SEQUENCE:
        x1, x2 = (left, right) if who == "active" else (right, left)
        style = "active" if who == "active" else "passive"
        stroke = EDGE_STYLES[style][0]
        diagram.extra.append(
            f'<line x1="{fmt(x1)}" y1="{fmt(y(sent))}" x2="{fmt(x2)}" y2="{fmt(y(arrived))}" '
            f'stroke="{stroke}" stroke-width="1.8" marker-end="url(#arrow-{style})"/>'
        )
        mid_x, mid_y = (x1 + x2) / 2, (y(sent) + y(arrived)) / 2
        diagram.extra.append(
            _text(
                mid_x,
                mid_y - 6,
                label,
                size=13,
                weight="bold",
                family=MONO,
                color=EDGE_STYLES[style][2],
                halo=True,
            )
        )
    for t, side, state, note in SEQUENCE_STATES:
        style = {"TIME_WAIT": "held", "CLOSED": "terminal"}.get(state, side)
        fill, stroke = NODE_STYLES[style]
        if side == "active":
            x_box, anchor_note, x_note = left - 12 - 128, "end", left - 150
        else:
            x_box, anchor_note, x_note = right + 12, "start", right + 150
        diagram.extra.append(
            f'<rect x="{fmt(x_box)}" y="{fmt(y(t) - 11)}" width="128" height="22" rx="5" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.2"/>'
        )
        diagram.extra.append(
            _text(x_box + 64, y(t) + 4, state, size=11.5, weight="bold", family=MONO, color=INK)
        )
        if note:
            diagram.text(x_note, y(t) + 4, note, anchor=anchor_note, size=11)
    # The TIME_WAIT span, broken to show it is not to scale.
    top, bottom = y(5.0) + 12, y(8.6) - 12
    bracket_x = left + 16
    held = NODE_STYLES["held"][1]
    diagram.extra.append(
        f'<path d="M{fmt(bracket_x)},{fmt(top)} L{fmt(bracket_x)},{fmt(bottom)}" '
        f'stroke="{held}" stroke-width="3" stroke-dasharray="2 5" fill="none"/>'
    )
    diagram.text(
        bracket_x + 10,
        (top + bottom) / 2 - 20,
        "2·MSL = 60 s on Linux (not to scale):\n"
        "the 4-tuple stays taken; a retransmitted\n"
        "FIN is ACKed again; late segments of\n"
        "this connection die out",
        anchor="start",
        size=11,
        color=EDGE_STYLES["timer"][2],
    )
    return diagram


# -- 3. tcpclose's close plan, from tcpclose._plan, laid out by Graphviz ------------------------

#: Events that can end a close early in almost every phase. When they lead to the
#: close phase they are written in the source box ("reset · error → close") instead
#: of as one more arrow each; every other transition is an arrow.
_EARLY_END = ("reset", "error")

#: Graphviz measures text with this font; the SVG names it first, then generic fallbacks.
_DOT_FONT = "DejaVu Sans"
_DOT_MONO = "DejaVu Sans Mono"


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def close_plan_dot() -> str | None:
    """The close plan as Graphviz DOT text, from ``tcpclose._plan.TRANSITIONS``,
    ``EFFECTS``, ``AUTOMATIC`` and ``ENTRY``; None when ``tcpclose._plan`` cannot be
    imported.

    Only styles live here; which boxes and arrows exist, and their labels, come from
    the plan's tables, and Graphviz places them so that no two labels overlap.
    """
    try:
        from tcpclose import _plan
    except ImportError as exc:  # the plan is another module's; the docs must still build
        print(f"gen_state_diagram: tcpclose._plan not importable ({exc}); skipped", file=sys.stderr)
        return None
    transitions: Mapping[tuple[object, object], object] = _plan.TRANSITIONS
    entry: Mapping[object, object] = _plan.ENTRY
    effects: Mapping[tuple[object, object], object] = getattr(_plan, "EFFECTS", {})
    automatic: Mapping[object, Sequence[tuple[object, object]]] = getattr(_plan, "AUTOMATIC", {})

    def name(value: object) -> str:
        return str(getattr(value, "value", value))

    conditions: dict[tuple[str, str], list[str]] = {}
    for phase, moves in automatic.items():
        for condition, event in moves:
            conditions.setdefault((name(phase), name(event)), []).append(name(condition))

    def edge_label(src: object, event: object) -> str:
        """``event``, its conditions when automatic, what it records."""
        e = name(event)
        label = e
        when = conditions.get((name(src), e))
        if when:
            label += f" [{' | '.join(when)}]"
        recorded = effects.get((src, event))
        if recorded is not None:
            words = [w for w in str(recorded).split(", ") if w not in ("", e, f"outcome={e}")]
            if words:
                label += " / " + ", ".join(words)
        return label

    phases: list[str] = []
    for (src, _event), dst in transitions.items():
        for phase in (name(src), name(dst)):
            if phase not in phases:
                phases.append(phase)
    for phase in entry.values():
        if name(phase) not in phases:
            phases.append(name(phase))
    early: dict[str, list[str]] = {}
    merged: dict[tuple[str, str], list[str]] = {}
    for (src, event), dst in transitions.items():
        s, e, d = name(src), name(event), name(dst)
        if d == "close" and e in _EARLY_END and s != "close":
            early.setdefault(s, []).append(e)
            continue
        merged.setdefault((s, d), []).append(edge_label(src, event))

    lines = [
        "digraph close_plan {",
        '  graph [rankdir=TB, nodesep=0.45, ranksep=0.5, bgcolor="white", pad=0.2,',
        '         label="generated from tcpclose._plan.TRANSITIONS, EFFECTS, AUTOMATIC and ENTRY'
        ' by Graphviz",',
        f'         labelloc=b, labeljust=r, fontsize=9, fontcolor="{MUTED}",',
        f'         fontname="{_DOT_FONT}"];',
        '  node [shape=box, style="rounded,filled", fillcolor="#eef2fb", color="#5b7fd6",',
        f'        fontname="{_DOT_MONO}", fontsize=12, fontcolor="{INK}", margin="0.18,0.08"];',
        f'  edge [color="#5c6370", fontname="{_DOT_FONT}", fontsize=10, fontcolor="{INK}",',
        "        arrowsize=0.7];",
    ]
    styles = {
        "abort": 'fillcolor="#fdecec", color="#c92a2a"',
        "close": 'fillcolor="#eceef1", color="#5c6370"',
        "done": 'fillcolor="#eceef1", color="#5c6370"',
    }
    for phase in phases:
        sub = " · ".join(early.get(phase, ()))
        if sub:
            label = (
                f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1"><TR><TD>{escape(phase)}</TD>'
                f'</TR><TR><TD><FONT POINT-SIZE="9" FACE="{_DOT_FONT}" COLOR="{MUTED}">'
                f"{escape(sub)} → close</FONT></TD></TR></TABLE>>"
            )
        else:
            label = _dot_quote(phase)
        style = styles.get(phase, "")
        lines.append(f"  {_dot_quote(phase)} [label={label}{', ' + style if style else ''}];")
    lines.append("  { rank=source;")
    for mode in entry:
        key = f"policy: {name(mode)}"
        lines.append(
            f'    {_dot_quote(key)} [shape=box, style="rounded,filled", fillcolor="#ffffff",'
            f' color="#8a8f98", fontname="{_DOT_FONT}", fontsize=11];'
        )
    lines.append("  }")
    for mode, phase in entry.items():
        lines.append(
            f"  {_dot_quote(f'policy: {name(mode)}')} -> {_dot_quote(name(phase))}"
            ' [style=dashed, color="#8a8f98"];'
        )
    fallback_sources = {"fallback", "check-unacked"}
    for (src, dst), events in merged.items():
        attrs = [f"label={_dot_quote(chr(10).join(events))}"]
        if all("[" in event for event in events):
            attrs.append("style=dashed")  # the plan's own move
        if src in fallback_sources:
            attrs.append('color="#e8590c", fontcolor="#a63c00"')
        if dst == "abort":
            attrs.append('color="#c92a2a"')
        lines.append(f"  {_dot_quote(src)} -> {_dot_quote(dst)} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def close_plan() -> str | None:
    """The close plan as SVG, laid out by Graphviz's ``dot``; None when ``dot`` is not
    installed or ``tcpclose._plan`` cannot be imported (the committed SVG then stays)."""
    source = close_plan_dot()
    dot = shutil.which("dot")
    if source is None:
        return None
    if dot is None:
        print("gen_state_diagram: Graphviz 'dot' not found; close_plan.svg kept", file=sys.stderr)
        return None
    done = subprocess.run(
        [dot, "-Tsvg"], input=source, capture_output=True, text=True, timeout=60, check=True
    )
    # The generator's version in the file is noise in a diff; the drawing is not.
    return re.sub(r"<!-- Generated by graphviz version [^>]*-->\n", "", done.stdout)


# -- main ----------------------------------------------------------------------------------------


def render_all() -> dict[str, str]:
    """File name -> SVG text for every diagram that can be drawn now."""
    out = {
        "tcp_close_states.svg": tcp_close_states().render(),
        "tcp_close_sequence.svg": tcp_close_sequence().render(),
    }
    plan = close_plan()
    if plan is not None:
        out["close_plan.svg"] = plan
    return out


def write_all(img_dir: Path = IMG_DIR) -> list[Path]:
    """Write the diagrams whose content changed; return the paths written."""
    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, svg in render_all().items():
        path = img_dir / filename
        if not path.exists() or path.read_text(encoding="utf-8") != svg:
            path.write_text(svg, encoding="utf-8")
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a committed SVG differs from the tables",
    )
    parser.add_argument("--out", type=Path, default=IMG_DIR, help="output directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = [
            name
            for name, svg in render_all().items()
            if not (args.out / name).exists()
            or (args.out / name).read_text(encoding="utf-8") != svg
        ]
        for name in stale:
            print(f"stale: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
