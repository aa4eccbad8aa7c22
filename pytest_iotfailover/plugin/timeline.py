"""The HTML timeline of a run report (see report_schema.json): one self-contained page, or one test's fragment.

Drawn as plain server-side SVG rather than with a charting library: the picture is lanes of intervals and
tick marks, which SVG expresses directly, the page then needs no JavaScript to render (pytest-html inserts
extras with innerHTML, which does not run <script> elements), and there is nothing to inline or keep
up to date. Ticks of one kind in one lane are a single <path>, so 10,000 messages are a few hundred
elements, not tens of thousands. Beyond MAX_LANES devices, lanes become about BANDS density bands: the
top of a band stacks the share of its devices in each connection state over time, the bottom carries
the band's message ticks.

A message an Outbox sent has a send tick at the start of each attempt the Outbox kept (`attempts`;
at the application's submit time, `submitted`, when it was never attempted) and its acknowledgement
tick when the device got the acknowledgement (`device_acked`; the hub's `acked` otherwise). One that
got no acknowledgement and never reached the backend is a hollow circle at its submit time, given up
or still pending (see `never_acked`), and a "messages in the lanes" table counts them.

Hovering a lane shows the nearest message's id; that small handler sits in an attribute of the <svg>
(inline handlers still run where inserted <script> elements do not) and reads per-lane data attributes.

Every string from the report is user data (device ids, message ids, fault parameters): it is redacted
for keys and SAS signatures, then escaped for the context it lands in.
"""
import datetime
import html
import json
import math
import os
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

from ..redaction import redact

MAX_LANES = 50          # above this many devices, lanes are grouped into density bands ...
BANDS = 25              # ... about this many
PLOT_W = 760            # px of time axis
LABEL_W = 160
LANE_H, BAND_H, GAP = 16, 26, 3
BAND_STATE_SHARE = 0.55  # top of a band: state shares; below: the message ticks
AXIS_H = 44
BINS = 300              # time bins of a density band

STATES = ("connected", "reconnecting", "refused", "throttled", "disconnected")
STATE_COLOURS = {"connected": "#cdeacb", "reconnecting": "#ffdf99", "refused": "#f4a3a3",
                 "throttled": "#cbb8ec", "disconnected": "#e4e4e4"}
# (kind, colour, top and bottom of the tick as a share of the lane height, stroke width)
TICKS = (("send", "#1f5fa8", 0.0, 0.34, 1),
         ("failed_attempt", "#b36b00", 0.0, 0.2, 1),
         ("ack", "#1b6e3a", 0.34, 0.67, 1),
         ("delivery", "#333333", 0.67, 1.0, 1),
         ("duplicate", "#f07800", 0.0, 1.0, 2),
         ("lost_in_failover", "#d0021b", 0.0, 1.0, 2))
# hollow circles at the submit time of a message that never reached the backend unacknowledged:
# (kind, stroke colour, dash pattern or "")
MARKS = (("never_acked_lost", "#7a0010", ""),       # given up: dropped, or its Outbox closed
         ("never_acked_pending", "#6b6b6b", "2 1.5"))  # still being retried when the test ended
FATES = ("delivered", "lost", "lost_in_failover", "in_flight")
# hover texts, by _fate_index: the report's fates, then two finer cases of the Outbox's view
_FATE_TEXT = ["delivered", "never acknowledged; given up (lost)", "acknowledged, then lost in the failover",
              "never acknowledged; still pending when the test ended", "acknowledged; not in the backend's view yet",
              "delivered; the device never got the acknowledgement"]

# !important on cell layout: a host page (pytest-html styles `#results-table td`) must not re-align the figures;
# the plot's min-height lets the tallest hover text (five lines) fit beside a single lane without a scrollbar
_CSS = """
.iotf{font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f}
.iotf h2{font-size:15px;margin:18px 0 6px;word-break:break-all}
.iotf .iotf-body{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.iotf .iotf-plot{position:relative;overflow-x:auto;max-width:100%;min-height:104px}
.iotf svg{display:block;background:#fff}
.iotf .iotf-tip{position:absolute;display:none;pointer-events:none;background:#222;color:#fff;
 padding:3px 6px;border-radius:3px;font-size:12px;white-space:pre;z-index:5}
.iotf table{border-collapse:collapse;margin:0 0 10px;font-size:12px}
.iotf th,.iotf td{border:1px solid #ddd!important;padding:2px 6px!important;text-align:left!important;
 vertical-align:top}
.iotf th{background:#f4f4f6;font-weight:600}
.iotf td.num{text-align:right!important;font-variant-numeric:tabular-nums}
.iotf .ok{color:#1b6e3a;font-weight:600}.iotf .bad{color:#c00018;font-weight:600}
.iotf .muted{color:#777}
.iotf .iotf-legend span{display:inline-block;margin-right:12px;font-size:12px}
.iotf .iotf-legend i{display:inline-block;width:12px;height:10px;margin-right:4px;vertical-align:-1px}
"""

# Runs as the <svg>'s onmousemove: find the lane under the pointer, then the nearest message in it.
_HOVER_JS = (
    "var s=this,t=s.parentNode.querySelector('.iotf-tip'),p=s.createSVGPoint();"
    "p.x=event.clientX;p.y=event.clientY;var q=p.matrixTransform(s.getScreenCTM().inverse()),"
    "g=null,L=s.querySelectorAll('g[data-m]');"
    "for(var i=0;i<L.length;i++){var y=+L[i].getAttribute('data-y');"
    "if(q.y>=y&&q.y<y+(+L[i].getAttribute('data-h'))){g=L[i];break}}"
    "if(!g){t.style.display='none';return}"
    "var m=g.iotfM||(g.iotfM=JSON.parse(g.getAttribute('data-m'))),lo=0,hi=m.length;"
    "while(lo<hi){var mid=(lo+hi)>>1;if(m[mid][0]<q.x)lo=mid+1;else hi=mid}"
    "var b=null,d=7;[lo-1,lo].forEach(function(k){if(k>=0&&k<m.length&&Math.abs(m[k][0]-q.x)<d)"
    "{d=Math.abs(m[k][0]-q.x);b=m[k]}});"
    "if(!b){t.style.display='none';return}"
    "var F=JSON.parse(s.getAttribute('data-fates')),D=g.iotfD||(g.iotfD=JSON.parse(g.getAttribute('data-d'))),"
    "T=function(v){return '+'+(v/1000).toFixed(3)+'s'},A=b[10],x=[b[1],D[b[7]],"
    "(F[b[2]]||'?')+'; '+(b[9]?'submitted':'sent')+' '+T(b[3])+(b[4]>1&&!A.length?' ('+b[4]+' attempts)':'')];"
    # at most the first and the latest three attempts, so the text stays narrower than the plot
    "if(A.length)x.push((b[4]>1?b[4]+' attempts':'attempt')+' started '"
    "+(A.length>4?T(A[0])+', … '+A.slice(-3).map(T).join(', '):A.map(T).join(', ')));"
    "var a=[];if(b[8]>=0)a.push('at the hub '+T(b[8]));"
    "if(b[11]>=0)a.push('acknowledged at the device '+T(b[11]));else if(b[5]>=0)a.push('acked '+T(b[5]));"
    "if(b[6])a.push(b[6]+' duplicate(s)');if(a.length)x.push(a.join(', '));"
    "t.textContent=x.join('\\n');"
    # placed below-right of the pointer, or above / left of it where it would leave the plot (and scroll it)
    "t.style.display='block';var c=s.parentNode,r=c.getBoundingClientRect(),"
    "x=event.clientX-r.left+c.scrollLeft+12,y=event.clientY-r.top+12;"
    "if(x+t.offsetWidth>c.scrollWidth)x-=t.offsetWidth+24;if(y+t.offsetHeight>c.clientHeight)y-=t.offsetHeight+24;"
    "t.style.left=Math.max(0,x)+'px';t.style.top=Math.max(0,y)+'px'"
)


def _s(value: Any) -> str:
    """Report text to HTML text or attribute value: redacted, then escaped."""
    return html.escape(redact(str(value)), quote=True)


def _num(v: float | None, unit: str = "s", digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v}{unit}"
    return f"{v:.{digits}f}{unit}"


class _Scale:
    def __init__(self, t0: float, t1: float):
        self.t0 = t0
        self.span = max(t1 - t0, 1e-6)

    def x(self, t: float) -> float:
        return LABEL_W + min(max((t - self.t0) / self.span, 0.0), 1.0) * PLOT_W


def _time_range(test: dict[str, Any]) -> tuple[float, float]:
    lo, hi = test.get("started_at"), test.get("ended_at")
    points: list[float] = [v for v in (lo, hi) if v is not None]
    for f in test.get("faults") or []:
        points += [v for v in (f.get("started_at"), f.get("ended_at")) if v is not None]
    for d in test.get("devices") or []:
        for iv in d.get("states") or []:
            points += [v for v in (iv.get("from"), iv.get("to")) if v is not None]
        for m in d.get("messages") or []:
            points += list(m.get("sent") or []) + list(m.get("failures") or []) + list(m.get("attempts") or [])
            if m.get("submitted") is not None:
                points.append(m["submitted"])
            points += [v for v in (m.get("acked"), m.get("device_acked"), m.get("delivered"), m.get("lost_at"))
                       if v is not None]
            points += list(m.get("duplicates") or [])
    if not points:
        return 0.0, 1.0
    return min(points), max(points)


def _nice_step(span: float) -> float:
    raw = span / 10
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600):
        if step >= raw:
            return step
    return 3600 * math.ceil(raw / 3600)


def _send_time(m: dict[str, Any]) -> float | None:
    """The application's submit time when an Outbox sent it, else the hub's first arrival."""
    if m.get("submitted") is not None:
        return float(m["submitted"])
    sent = m.get("sent") or []
    return float(sent[0]) if sent else None


def _send_ticks(m: dict[str, Any]) -> list[float]:
    """Each attempt an Outbox started, else its submit time (never attempted), else every arrival
    the hub saw (a message no Outbox of the test sent)."""
    if m.get("attempts"):
        return list(m["attempts"])
    if m.get("submitted") is not None:
        return [m["submitted"]]
    return list(m.get("sent") or [])


def _ack_time(m: dict[str, Any]) -> float | None:
    """When the device got the acknowledgement, else when the hub gave it."""
    at = m.get("device_acked")
    return at if at is not None else m.get("acked")


def never_acked(m: dict[str, Any]) -> str | None:
    """"lost" or "pending" for a message that neither got an acknowledgement nor reached the backend."""
    if m.get("acked") is not None or m.get("device_acked") is not None or m.get("outbox_state") == "acknowledged":
        return None
    fate = m.get("fate")
    return "lost" if fate == "lost" else "pending" if fate == "in_flight" else None


def _ticks_of(messages: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k, *_ in TICKS}
    out.update({k: [] for k, *_ in MARKS})
    for m in messages:
        out["send"] += _send_ticks(m)
        out["failed_attempt"] += m.get("failures") or []
        ack = _ack_time(m)
        if ack is not None and m.get("fate") != "lost_in_failover":
            out["ack"].append(ack)
        if m.get("delivered") is not None:
            out["delivery"].append(m["delivered"])
        out["duplicate"] += m.get("duplicates") or []
        if m.get("fate") == "lost_in_failover":
            out["lost_in_failover"].append(m.get("acked") or m.get("lost_at") or (m.get("sent") or [0])[-1])
        never = never_acked(m)
        at = _send_time(m)
        if never is not None and at is not None:
            out[f"never_acked_{never}"].append(at)
    return out


def _tick_paths(ticks: dict[str, list[float]], sc: _Scale, y: float, h: float,
                lane_y: float, lane_h: float) -> list[str]:
    parts = []
    for kind, colour, top, bottom, width in TICKS:
        # the marks that matter most span the whole lane or band
        ty, th = (lane_y, lane_h) if (top, bottom) == (0.0, 1.0) else (y, h)
        xs = sorted({round(sc.x(t), 1) for t in ticks[kind]})  # ticks on the same pixel are drawn once
        if not xs:
            continue
        y0, dy = round(ty + top * th, 1), round((bottom - top) * th, 1)
        d = "".join(f"M{x:g} {y0:g}v{dy:g}" for x in xs)
        parts.append(f'<path class="iotf-tick iotf-{kind}" data-count="{len(ticks[kind])}" stroke="{colour}" '
                     f'stroke-width="{width}" d="{d}"/>')
    # the never-acknowledged circles sit on the lane's middle, drawn last so no tick covers them
    r = round(min(4.5, lane_h * 0.28), 1)
    cy = round(lane_y + lane_h / 2, 1)
    for kind, colour, dash in MARKS:
        xs = sorted({round(sc.x(t), 1) for t in ticks[kind]})
        if not xs:
            continue
        d = "".join(f"M{x - r:g} {cy:g}a{r:g} {r:g} 0 1 0 {2 * r:g} 0a{r:g} {r:g} 0 1 0 {-2 * r:g} 0" for x in xs)
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<path class="iotf-mark iotf-never-acked iotf-{kind.replace("_", "-")}" '
                     f'data-count="{len(ticks[kind])}" fill="#fff" fill-opacity="0.85" stroke="{colour}" '
                     f'stroke-width="1.3"{dashes} d="{d}"/>')
    return parts


def _attr_json(value: Any) -> str:
    return html.escape(json.dumps(value, separators=(",", ":"), ensure_ascii=False), quote=True)


def _fate_index(m: dict[str, Any]) -> int:
    """Index into _FATE_TEXT."""
    fate = m.get("fate")
    if fate == "in_flight" and m.get("outbox_state") == "acknowledged":
        return 4
    if fate == "delivered" and m.get("acked") is None and m.get("outbox_state") in ("pending", "dropped"):
        return 5
    return FATES.index(fate) if fate in FATES else -1


def _hover_data(group: Sequence[dict[str, Any]], sc: _Scale) -> str:
    """Per message, compactly: [x, id, fate text index, send ms, attempts, acked ms or -1, duplicates,
    device index, first arrival at the hub ms or -1, 1 if the send time is the application's submit,
    [ms of each attempt start kept], device acknowledgement ms or -1]."""
    def ms(t: float | None) -> int:
        return -1 if t is None else round((t - sc.t0) * 1000)
    rows: list[list[Any]] = []
    for di, d in enumerate(group):
        for m in d.get("messages") or []:
            sent = m.get("sent") or [sc.t0]
            at = _send_time(m)
            at = sc.t0 if at is None else at
            outboxed = m.get("submitted") is not None
            arrived = -1 if (not outboxed or m.get("fate") in ("lost", "in_flight")) else ms(sent[0])
            if m.get("attempt_count") is not None:
                attempts = int(m["attempt_count"])
            else:  # a report without attempt times: one attempt and one more per failure
                attempts = 1 + len(m.get("failures") or []) if outboxed else len(sent)
            rows.append([round(sc.x(at), 1), redact(str(m.get("id", ""))), _fate_index(m), ms(at), attempts,
                         ms(m.get("acked")), len(m.get("duplicates") or []), di, arrived, int(outboxed),
                         [ms(t) for t in m.get("attempts") or []], ms(m.get("device_acked"))])
    rows.sort(key=lambda r: r[0])
    return _attr_json(rows)


def _state_at(states: Sequence[dict[str, Any]], starts: Sequence[float], t: float, end: float) -> str | None:
    i = bisect_left(starts, t + 1e-12) - 1
    if i < 0:
        return None
    iv = states[i]
    to = iv.get("to")
    return iv["state"] if (end if to is None else to) > t else None


def _band_states(devices: Sequence[dict[str, Any]], sc: _Scale, y: float, h: float, end: float) -> list[str]:
    """Stacked share of devices per state, as merged rectangles, one path per state."""
    n = len(devices)
    prepared = []
    for d in devices:
        st = sorted(d.get("states") or [], key=lambda iv: iv["from"])
        prepared.append((st, [iv["from"] for iv in st]))
    bin_w = PLOT_W / BINS
    shapes: dict[str, list[tuple[int, int, float, float]]] = {s: [] for s in STATES}
    for b in range(BINS):
        t = sc.t0 + (b + 0.5) * sc.span / BINS
        counts = dict.fromkeys(STATES, 0)
        for st, starts in prepared:
            s = _state_at(st, starts, t, end)
            if s in counts:
                counts[s] += 1
        acc = 0
        for s in STATES:
            c = counts[s]
            if c:
                y0, y1 = y + h * acc / n, y + h * (acc + c) / n
                runs = shapes[s]
                if runs and runs[-1][1] == b - 1 and runs[-1][2] == y0 and runs[-1][3] == y1:
                    runs[-1] = (runs[-1][0], b, y0, y1)
                else:
                    runs.append((b, b, y0, y1))
                acc += c
    out = []
    for s in STATES:
        if shapes[s]:
            path = "".join(f"M{LABEL_W + a * bin_w:.1f} {y0:.2f}H{LABEL_W + (b + 1) * bin_w:.1f}V{y1:.2f}"
                           f"H{LABEL_W + a * bin_w:.1f}Z" for a, b, y0, y1 in shapes[s])
            out.append(f'<path class="iotf-state iotf-state-{s}" fill="{STATE_COLOURS[s]}" d="{path}"/>')
    return out


def _lanes(test: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    devices = list(test.get("devices") or [])
    if len(devices) <= MAX_LANES:
        return [(str(d.get("device_id", "")), [d]) for d in devices]
    size = math.ceil(len(devices) / BANDS)
    bands = []
    for i in range(0, len(devices), size):
        group = devices[i:i + size]
        first, last = str(group[0].get("device_id", "")), str(group[-1].get("device_id", ""))
        common = len(os.path.commonprefix([first, last]))
        while common and last[common - 1].isdigit():  # keep the whole number: dev-010 … 019, not … 19
            common -= 1
        bands.append((f"{first} … {last[common:]} ({len(group)})" if len(group) > 1 else first, group))
    return bands


def _svg(test: dict[str, Any]) -> str:
    t0, t1 = _time_range(test)
    sc = _Scale(t0, t1)
    lanes = _lanes(test)
    banded = len(test.get("devices") or []) > MAX_LANES
    lane_h = BAND_H if banded else LANE_H
    height = AXIS_H + len(lanes) * (lane_h + GAP) + 6
    width = LABEL_W + PLOT_W + 12
    out = [(f'<svg class="iotf-timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" data-lanes="{len(lanes)}" data-banded="{int(banded)}" '
           f'data-fates="{_attr_json(_FATE_TEXT)}" onmousemove="{html.escape(_HOVER_JS, quote=True)}" '
           f'onmouseleave="this.parentNode.querySelector(\'.iotf-tip\').style.display=\'none\'" '
           f'font-family="system-ui,sans-serif" font-size="11">')]
    out.append(_svg_axis(sc, t0, height))
    lane_of: dict[str, float] = {}
    for i, (label, group) in enumerate(lanes):
        y = AXIS_H + i * (lane_h + GAP)
        for d in group:
            lane_of.setdefault(str(d.get("device_id", "")), y)
        out.append(_svg_lane(label, group, sc, y, lane_h, banded, t1))
    # fault windows go over the lanes, translucent, and let the pointer through to the lanes' hover
    for n, f in enumerate(f for f in test.get("faults") or [] if f.get("started_at") is not None):
        out.append(_svg_fault(n, f, sc, t0, t1, height, width, lane_of, lane_h))
    out.append("</svg>")
    return "".join(out)


def _svg_axis(sc: "_Scale", t0: float, height: float) -> str:
    step = _nice_step(sc.span)
    k = 0
    axis = []
    while k * step <= sc.span + 1e-9:
        x = sc.x(t0 + k * step)
        label = f"{k * step:g}s"
        axis.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{AXIS_H - 6}" y2="{height - 4}" stroke="#eee"/>'
                    f'<text x="{x:.1f}" y="{AXIS_H - 9}" text-anchor="middle" fill="#555">{label}</text>')
        k += 1
    return '<g class="iotf-axis">' + "".join(axis) + "</g>"


def _svg_lane(label: str, group: list[dict[str, Any]], sc: "_Scale", y: float, lane_h: float, banded: bool,
              end: float) -> str:
    msgs = [m for d in group for m in d.get("messages") or []]
    ticks = _ticks_of(msgs)
    never = len(ticks["never_acked_lost"]) + len(ticks["never_acked_pending"])
    tip = (f"{label}: {len(msgs)} messages, {never} never acknowledged "
           f"({len(ticks['never_acked_pending'])} still pending), {len(ticks['duplicate'])} duplicates, "
           f"{len(ticks['lost_in_failover'])} lost in failover")
    attrs = (f'class="iotf-lane" data-y="{y}" data-h="{lane_h}" '
             + (f'data-band="{len(group)}"' if banded else f'data-device="{_s(label)}"'))
    devs = _attr_json([redact(str(d.get("device_id", ""))) for d in group])
    parts = [f'<g {attrs} data-d="{devs}" data-m="{_hover_data(group, sc)}"><title>{_s(tip)}</title>',
             f'<rect x="{LABEL_W}" y="{y}" width="{PLOT_W}" height="{lane_h}" fill="#fafafa"/>']
    tick_y, tick_h = float(y), float(lane_h)
    if banded:
        parts += _band_states(group, sc, y, lane_h * BAND_STATE_SHARE, end)
        tick_y, tick_h = y + lane_h * BAND_STATE_SHARE + 1, lane_h * (1 - BAND_STATE_SHARE) - 1
    else:
        for iv in group[0].get("states") or []:
            s = iv.get("state")
            x0 = sc.x(iv["from"])
            x1 = sc.x(iv["to"] if iv.get("to") is not None else end)
            parts.append(f'<rect class="iotf-state iotf-state-{_s(s)}" x="{x0:.1f}" y="{y}" '
                         f'width="{max(x1 - x0, 0.5):.1f}" height="{lane_h}" '
                         f'fill="{STATE_COLOURS.get(s, "#e4e4e4")}"/>')
    parts += _tick_paths(ticks, sc, tick_y, tick_h, y, lane_h)
    text = label if len(label) <= 26 else label[:25] + "…"
    parts.append(f'<text x="{LABEL_W - 6}" y="{y + lane_h * 0.72:.1f}" text-anchor="end" '
                 f'fill="#333">{_s(text)}</text></g>')
    return "".join(parts)


def _svg_fault(n: int, f: dict[str, Any], sc: "_Scale", t0: float, t1: float, height: float, width: float,
               lane_of: dict[str, float], lane_h: float) -> str:
    x0 = sc.x(f["started_at"])
    x1 = sc.x(f["ended_at"] if f.get("ended_at") is not None else t1)
    y0, y1 = float(AXIS_H - 4), float(height - 4)
    target = f.get("target")
    if target is not None and str(target) in lane_of:  # a one-device fault shades that device's lane
        y0 = lane_of[str(target)] - 1
        y1 = y0 + lane_h + 2
    label = _s(f.get("kind", "fault")) + (f" @ {_s(target)}" if target else "")
    until = _num(f["ended_at"] - t0, "s", 2) if f.get("ended_at") is not None else "end"
    # a label that would run off the right edge ends at the window's start instead
    chars = len(str(f.get("kind", ""))) + len(str(target or "")) + 18
    anchor = ' text-anchor="end" dx="-6"' if x0 + chars * 6.2 > width else ""
    return (f'<g class="iotf-fault" data-fault-id="{_s(f.get("id", ""))}" pointer-events="none">'
            f'<rect class="iotf-fault-window" x="{x0:.1f}" y="{y0:g}" width="{max(x1 - x0, 1):.1f}" '
            f'height="{y1 - y0:g}" fill="#d0021b" fill-opacity="0.10" stroke="#d0021b" '
            f'stroke-opacity="0.7" stroke-dasharray="4 3"/>'
            f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{6 + 12 * (n % 2)}" y2="{y0:g}" stroke="#d0021b" '
            f'stroke-opacity="0.5"/>'
            f'<text x="{x0 + 3:.1f}" y="{10 + 12 * (n % 2)}" fill="#a00015" font-weight="600"{anchor}>{label} '
            f'<tspan font-weight="400">{_num(f["started_at"] - t0, "s", 2)} – {until}</tspan></text></g>')


def _legend() -> str:
    items = [f'<span><i style="background:{c}"></i>{s}</span>' for s, c in STATE_COLOURS.items()]
    names = {"send": "send attempt", "failed_attempt": "failed attempt", "ack": "acknowledged (at the device)",
             "delivery": "delivered", "duplicate": "duplicate", "lost_in_failover": "lost in failover",
             "never_acked_lost": "never acknowledged, given up", "never_acked_pending": "never acknowledged, pending"}
    items += [f'<span><i style="background:{c};width:3px"></i>{names[k]}</span>' for k, c, *_ in TICKS]
    items += [f'<span><i style="border:1.5px {"dashed" if dash else "solid"} {c};border-radius:50%;width:7px;'
              f'height:7px;background:#fff"></i>{names[k]}</span>' for k, c, dash in MARKS]
    items.append('<span><i style="background:#d0021b;opacity:.25"></i>fault window</span>')
    return '<div class="iotf-legend">' + "".join(items) + "</div>"


_FIGURES = (("outage", "outage", "s"), ("time_to_detect", "time to detect", "s"),
            ("time_to_recover", "time to recover", "s"), ("downtime_max", "downtime max", "s"),
            ("downtime_p99", "downtime p99", "s"), ("lost", "lost", ""),
            ("lost_in_failover", "lost in failover (RPO)", ""), ("duplicates", "duplicates", ""),
            ("duplicates_pct", "duplicates %", "%"), ("latency_p99", "latency p99", "s"),
            ("throttled_time", "throttled", "s"))


def _fault_table(f: dict[str, Any]) -> str:
    fig = f.get("figures") or {}
    params = ", ".join(f"{_s(k)}={_s(v)}" for k, v in sorted((f.get("params") or {}).items())) or "—"
    rows = [f'<tr><th colspan="2">{_s(f.get("kind", "fault"))}'
            + (f" @ {_s(f['target'])}" if f.get("target") else " (whole hub)")
            + (' <span class="muted">cancelled</span>' if f.get("cancelled") else "")
            + f'</th></tr><tr><td>parameters</td><td>{params}</td></tr>']
    for key, name, unit in _FIGURES:
        if key in fig:
            digits = 1 if unit == "%" else 3
            rows.append(f'<tr><td>{name}</td><td class="num" data-figure="{key}">'
                        f'{_num(fig[key], unit, digits)}</td></tr>')
    rec = f.get("recovery") or []
    by = {"recovered": 0, "not_recovered": 0, "never_disconnected": 0}
    for r in rec:
        by[r.get("status", "")] = by.get(r.get("status", ""), 0) + 1
    rows.append(f'<tr><td>devices</td><td>{by["recovered"]} recovered, '
                f'<span class="{"bad" if by["not_recovered"] else "muted"}">{by["not_recovered"]} not recovered'
                f'</span>, {by["never_disconnected"]} never disconnected</td></tr>')
    table = f'<table class="iotf-figures" data-fault-id="{_s(f.get("id", ""))}">{"".join(rows)}</table>'
    return table + _recovery_table(rec, f.get("started_at"))


def _recovery_table(rec: list[dict[str, Any]], started: float | None) -> str:
    if not rec:
        return ""
    # the devices worth reading first: not recovered, then the longest downtimes
    order = sorted(rec, key=lambda r: (r.get("status") != "not_recovered", -(r.get("downtime") or 0)))
    shown = order[:10]
    label = {"recovered": "recovered", "not_recovered": "NOT RECOVERED", "never_disconnected": "never disconnected"}
    rows = []
    for r in shown:
        status = r.get("status", "")
        cls = "bad" if status == "not_recovered" else ("muted" if status == "never_disconnected" else "")
        back = r.get("reconnected_at")
        rows.append(f'<tr><td>{_s(r.get("device_id", ""))}</td><td class="{cls}">{label.get(status, _s(status))}'
                    f'</td><td class="num">{_num(r.get("downtime"))}</td><td class="num">'
                    f'{_num(back - started) if back is not None and started is not None else "—"}</td></tr>')
    more = (f'<tr><td colspan="4" class="muted">… {len(rec) - len(shown)} more</td></tr>'
            if len(rec) > len(shown) else "")
    return ('<table class="iotf-recovery"><tr><th>device</th><th>recovery</th><th>downtime</th>'
            f'<th>back at (after fault start)</th></tr>{"".join(rows)}{more}</table>')


def _delivery_table(d: dict[str, Any] | None) -> str:
    if not d:
        return ""
    keys = (("sent", ""), ("delivered", ""), ("duplicates", ""), ("lost", ""), ("lost_in_failover", ""),
            ("in_flight", ""), ("latency_p50", "s"), ("latency_p99", "s"), ("latency_max", "s"))
    rows = "".join(f'<tr><td>{k.replace("_", " ")}</td><td class="num" data-delivery="{k}">{_num(d[k], u)}</td></tr>'
                   for k, u in keys if k in d)
    return f'<table class="iotf-delivery"><tr><th colspan="2">delivery</th></tr>{rows}</table>'


def message_counts(test: dict[str, Any]) -> dict[str, int]:
    """What the lanes hold, counted: every message, the Outboxes' included, once."""
    msgs = [m for d in test.get("devices") or [] for m in d.get("messages") or []]
    never = [never_acked(m) for m in msgs]
    return {"messages": len(msgs), "submitted": sum(1 for m in msgs if m.get("submitted") is not None),
            "reached_hub": sum(1 for m, n in zip(msgs, never) if n is None and m.get("fate") != "in_flight"),
            "never_acknowledged": sum(1 for n in never if n is not None),
            "given_up": never.count("lost"), "still_pending": never.count("pending"),
            "failed_attempts": sum(len(m.get("failures") or []) for m in msgs),
            "lost_in_failover": sum(1 for m in msgs if m.get("fate") == "lost_in_failover"),
            "duplicates": sum(len(m.get("duplicates") or []) for m in msgs)}


_COUNT_NAMES = (("messages", "messages drawn"), ("submitted", "through an Outbox"),
                ("reached_hub", "reached the hub"), ("never_acknowledged", "never acknowledged"),
                ("given_up", "… given up"), ("still_pending", "… still pending at the end"),
                ("failed_attempts", "failed attempts"), ("lost_in_failover", "lost in failover"),
                ("duplicates", "duplicates"))


def _messages_table(test: dict[str, Any]) -> str:
    c = message_counts(test)
    if not c["messages"]:
        return ""
    rows = "".join(f'<tr><td>{name}</td><td class="num{" bad" if key == "never_acknowledged" and c[key] else ""}" '
                   f'data-messages="{key}">{c[key]}</td></tr>'
                   for key, name in _COUNT_NAMES if key in ("messages", "never_acknowledged") or c[key])
    return f'<table class="iotf-messages"><tr><th colspan="2">messages in the lanes</th></tr>{rows}</table>'


def _slo_table(slos: list[dict[str, Any]]) -> str:
    if not slos:
        return ""
    rows = []
    for s in slos:
        unit = _s(s.get("unit", ""))
        ok = bool(s.get("ok"))
        measured = s.get("measured")
        rows.append(f'<tr class="iotf-slo" data-ok="{int(ok)}"><td>{_s(s.get("name", ""))}</td>'
                    f'<td>{_s(s.get("metric", ""))} {_s(s.get("comparison", ""))} {_s(s.get("objective", ""))}'
                    f'{unit}</td><td class="num">'
                    f'{"not measured" if measured is None else _s(_num(measured, "", 3)) + unit}</td>'
                    f'<td class="{"ok" if ok else "bad"}">{"met" if ok else "MISSED"}</td></tr>')
    return ('<table class="iotf-slos"><tr><th>SLO</th><th>objective</th><th>measured</th><th>verdict</th></tr>'
            + "".join(rows) + "</table>")


def _baseline_table(b: dict[str, Any] | None) -> str:
    if not b or not b.get("results"):
        return ""
    rows = "".join(
        f'<tr><td>{_s(r.get("metric", ""))}</td><td class="num">{_num(r.get("baseline"), "")}</td>'
        f'<td class="num">{_num(r.get("measured"), "")}</td><td class="num">'
        f'{_num(r.get("tolerance"), "", 2) if r.get("tolerance") is not None else "—"}</td>'
        f'<td class="{"bad" if r.get("regressed") else "ok"}">{"regressed" if r.get("regressed") else "ok"}</td></tr>'
        for r in b["results"])
    return (f'<table class="iotf-baseline"><tr><th colspan="5">against baseline {_s(b.get("source", ""))}</th></tr>'
            '<tr><th>metric</th><th>baseline</th><th>measured</th><th>tolerance</th><th></th></tr>'
            f'{rows}</table>')


def _section(test: dict[str, Any]) -> str:
    if not isinstance(test, dict):
        raise TypeError(f"a test record must be an object, not {type(test).__name__}")
    try:
        return _draw_section(test)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        # a report that does not follow report_schema.json: name the test rather than fail deep inside
        raise ValueError(f"test {redact(str(test.get('nodeid', '?')))!r} does not follow the report schema "
                         f"({type(e).__name__}: {redact(str(e))})") from None


def _draw_section(test: dict[str, Any]) -> str:
    faults = [f for f in test.get("faults") or [] if f.get("started_at") is not None]
    side = ("".join(_fault_table(f) for f in faults) + _delivery_table(test.get("delivery"))
            + _messages_table(test)
            + _slo_table(test.get("slos") or []) + _baseline_table(test.get("baseline")))
    outcome = str(test.get("outcome", ""))
    return (f'<section class="iotf-test" data-nodeid="{_s(test.get("nodeid", ""))}">'
            f'<h2><span class="{"ok" if outcome == "passed" else "bad"}">{_s(outcome.upper())}</span> '
            f'{_s(test.get("nodeid", ""))}</h2>{_legend()}<div class="iotf-body">'
            f'<div class="iotf-plot">{_svg(test)}<div class="iotf-tip"></div></div>'
            f'<div class="iotf-side">{side}</div></div></section>')


def has_timeline(test: dict[str, Any]) -> bool:
    """Only tests that started a fault get a timeline."""
    return any(f.get("started_at") is not None for f in test.get("faults") or [])


def render_fragment(test: dict[str, Any]) -> str:
    """One test's timeline and figures, with its own scoped style, for `pytest_html.extras.html(...)`."""
    return f'<div class="iotf"><style>{_CSS}</style>{_section(test)}</div>'


def render_html(report: dict[str, Any]) -> str:
    """The whole run as one self-contained page: no external resource is referenced."""
    run = report.get("run") or {}
    tests = report.get("tests") or []
    meta_keys = ("backend", "hub_name", "hub_tier", "plugin_version", "sdk_version", "python_version",
                 "pytest_version", "workers")
    meta = "".join(f"<tr><th>{k.replace('_', ' ')}</th><td>{_s(run[k])}</td></tr>"
                   for k in meta_keys if run.get(k) is not None)
    if run.get("started_at") is not None:
        started = datetime.datetime.fromtimestamp(run["started_at"], datetime.UTC)
        meta += f"<tr><th>started</th><td>{started.isoformat(timespec='seconds')}</td></tr>"
    summary = []
    sections = []
    for i, t in enumerate(tests):
        outcome = str(t.get("outcome", ""))
        faults = ", ".join(_s(f.get("kind", "")) for f in t.get("faults") or []
                           if f.get("started_at") is not None) or '<span class="muted">no fault</span>'
        name = _s(t.get("nodeid", ""))
        if has_timeline(t):
            name = f'<a href="#t{i}">{name}</a>'
            sections.append(f'<div id="t{i}">{_section(t)}</div>')
        summary.append(f'<tr><td class="{"ok" if outcome == "passed" else "bad"}">{_s(outcome)}</td>'
                       f"<td>{name}</td><td>{faults}</td></tr>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width\">"
            f"<title>IoT Hub failover report</title><style>body{{margin:16px}}{_CSS}</style></head>"
            f'<body class="iotf"><h1 style="font-size:18px">IoT Hub failover report</h1>'
            f'<table class="iotf-run">{meta}</table>'
            f'<table class="iotf-summary"><tr><th>outcome</th><th>test</th><th>faults</th></tr>{"".join(summary)}'
            f'</table>{"".join(sections)}'
            # a mark for the bench: the page is parsed and its first frame is about to be drawn
            "<script>requestAnimationFrame(function(){performance.mark('iotf-rendered');"
            "document.documentElement.setAttribute('data-rendered','1')})</script>"
            "</body></html>\n")
