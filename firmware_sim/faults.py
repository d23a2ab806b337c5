"""Seeded fault plans: what goes wrong on a board's link, frame by frame, the same on every run.

Rules (docs/simulator.md, "Fault injection"):
- A ``FaultPlan`` is a list of rules. A rule names a kind, a direction (``up``: board to hub,
  ``down``: hub to board, or ``both``) and when it fires: at given frame numbers (``at``), or
  with a probability per frame (``rate``), between ``start`` and ``stop``, at most ``limit``
  times per direction.
- Link kinds act on one unit of the link: a serial frame on a serial link, a TLS record on the
  TCP path (the proxy sees only ciphertext, so any tampering there is TLS's to detect):
  ``drop``, ``corrupt`` (one bit flipped), ``truncate`` (the unit cut short), ``duplicate``,
  ``delay`` (``ms``; later units wait behind it, as on a real wire), ``disconnect`` (the cable
  is pulled: a serial link is unplugged for ``duration_ms``, the TCP path's connection is cut
  and new ones refused for ``duration_ms``). Board kinds act on the board the plan is bound to:
  ``power_cycle`` (``off_ms``), ``clock_skew`` (``ppm``, ``offset_ms``).
- Determinism: the decision for frame *n* in a direction is a pure function of (seed, rule,
  direction, n) plus the per-direction ``limit`` count, so the same seed over the same frames
  gives the same fault sequence whatever the thread timing. ``sequence()`` is that record.
- One plan per link: ``fork(name)`` gives each board of a fleet its own plan (same rules, a seed
  derived from the name).
- Counters (``LinkCounters``) are kept by the link: frames seen, delivered, dropped,
  corrupted, truncated, duplicated, delayed, disconnects, and ``recovered``: faults after which
  an intact frame went through in the same direction (the link carried traffic again).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

LINK_FAULTS = ("drop", "corrupt", "truncate", "duplicate", "delay", "disconnect")
BOARD_FAULTS = ("power_cycle", "clock_skew")
FAULT_KINDS = LINK_FAULTS + BOARD_FAULTS
DIRECTIONS = ("up", "down")
#: Parameters each kind takes, with their defaults.
DEFAULT_PARAMS: Dict[str, Dict[str, float]] = {
    "drop": {}, "corrupt": {}, "truncate": {}, "duplicate": {"copies": 2},
    "delay": {"ms": 200}, "disconnect": {"duration_ms": 0},
    "power_cycle": {"off_ms": 0}, "clock_skew": {"ppm": 0, "offset_ms": 0},
}


class FaultPlanError(ValueError):
    """A fault rule or spec is malformed (unknown kind, rate outside 0..1, bad parameter)."""


@dataclass(frozen=True)
class FaultEvent:
    """One fault the plan decided: on ``frame`` (0-based, per direction) of ``direction``."""

    direction: str
    frame: int
    kind: str
    rule: int
    params: Tuple[Tuple[str, float], ...] = ()
    #: Where in the unit (0 <= fraction < 1) a corrupt/truncate acts, and which bit flips.
    fraction: float = 0.0
    bit: int = 0

    def param(self, name: str) -> float:
        """A parameter of the event (its rule's value or the kind's default)."""
        for key, value in self.params:
            if key == name:
                return value
        return DEFAULT_PARAMS[self.kind].get(name, 0)


@dataclass
class FaultRule:
    """When and how one kind of fault fires (see the module rules)."""

    kind: str
    direction: str = "both"
    rate: Optional[float] = None
    at: Optional[frozenset] = None
    start: int = 0
    stop: Optional[int] = None
    limit: Optional[int] = None
    params: Dict[str, float] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ``FaultPlanError`` if the rule cannot be applied."""
        if self.kind not in FAULT_KINDS:
            raise FaultPlanError("unknown fault kind %r (one of %s)"
                                 % (self.kind, ", ".join(FAULT_KINDS)))
        if self.direction not in ("up", "down", "both"):
            raise FaultPlanError("direction must be up, down or both")
        if (self.rate is None) == (self.at is None):
            raise FaultPlanError("a %s rule needs exactly one of rate= or at=" % self.kind)
        if self.rate is not None and not 0.0 <= self.rate <= 1.0:
            raise FaultPlanError("rate must be between 0 and 1")
        if self.at is not None and any(not isinstance(n, int) or n < 0 for n in self.at):
            raise FaultPlanError("at= takes frame numbers >= 0")
        if self.limit is not None and self.limit < 0:
            raise FaultPlanError("limit must be >= 0")
        for name, value in self.params.items():
            if name not in DEFAULT_PARAMS[self.kind]:
                raise FaultPlanError("%s takes no parameter %r (it takes: %s)" % (
                    self.kind, name, ", ".join(DEFAULT_PARAMS[self.kind]) or "none"))
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise FaultPlanError("parameter %s must be a number" % name)
            if name in ("ms", "duration_ms", "off_ms", "copies") and value < 0:
                raise FaultPlanError("parameter %s must be >= 0" % name)

    def applies(self, direction: str, frame: int) -> bool:
        """True if this rule can fire on ``frame`` of ``direction`` (ignoring rate and limit)."""
        if self.direction != "both" and self.direction != direction:
            return False
        if frame < self.start or (self.stop is not None and frame >= self.stop):
            return False
        return self.at is None or frame in self.at


class FaultPlan:
    """A seeded list of fault rules for one link (and the board behind it)."""

    def __init__(self, seed: int = 0, rules: Sequence[FaultRule] = ()) -> None:
        self.seed = seed
        self.rules: List[FaultRule] = []
        self.enabled = True
        self.board: Any = None
        self.log: List[FaultEvent] = []
        self._fired: Dict[Tuple[int, str], int] = {}
        self._lock = threading.Lock()
        for rule in rules:
            self._add_rule(FaultRule(rule.kind, rule.direction, rule.rate, rule.at, rule.start,
                                     rule.stop, rule.limit, dict(rule.params)))

    def __repr__(self) -> str:
        return "<FaultPlan seed=%r rules=%d>" % (self.seed, len(self.rules))

    # -- building --------------------------------------------------------------------------

    def add(self, kind: str, rate: Optional[float] = None, at: Any = None,
            direction: Optional[str] = None, start: int = 0, stop: Optional[int] = None,
            limit: Optional[int] = None, **params: float) -> "FaultPlan":
        """Add a rule; returns the plan (chainable). ``at`` is a frame number or several."""
        if at is not None and not isinstance(at, (set, frozenset, list, tuple)):
            at = (at,)
        if direction is None:
            direction = "up" if kind in BOARD_FAULTS else "both"
        rule = FaultRule(kind, direction, rate, frozenset(at) if at is not None else None,
                         start, stop, limit, dict(params))
        self._add_rule(rule)
        return self

    def _add_rule(self, rule: FaultRule) -> None:
        rule.check()
        self.rules.append(rule)

    def fork(self, name: str) -> "FaultPlan":
        """The same rules with a seed derived from ``name`` and a fresh log (one per board)."""
        digest = hashlib.sha256(("%s/%s" % (self.seed, name)).encode()).digest()
        plan = FaultPlan(int.from_bytes(digest[:8], "big"), self.rules)
        plan.enabled = self.enabled
        return plan

    def bind_board(self, board: Any) -> None:
        """Board faults (power_cycle, clock_skew) act on ``board``."""
        self.board = board

    @contextlib.contextmanager
    def paused(self) -> Iterator["FaultPlan"]:
        """No faults inside the block (frames are still counted, so numbering stays)."""
        previous = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = previous

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0) -> "FaultPlan":
        """Parse ``"drop=0.02,delay=0.05:ms=300,power_cycle@40:off_ms=500,corrupt=0.01/up"``:
        ``kind=rate`` or ``kind@frame[+frame...]``, then ``:name=value`` parameters and an
        optional ``/up`` or ``/down`` direction."""
        plan = cls(seed)
        for item in filter(None, (part.strip() for part in spec.split(","))):
            head, _, rest = item.partition(":")
            head, _, direction = head.partition("/")
            params: Dict[str, float] = {}
            for pair in filter(None, rest.split(":")):
                name, equals, value = pair.partition("=")
                if not equals:
                    raise FaultPlanError("bad fault parameter %r in %r" % (pair, item))
                params[name.strip()] = _number(value, item)
            if "@" in head:
                kind, _, frames = head.partition("@")
                at = [int(_number(n, item)) for n in frames.split("+")]
                plan.add(kind.strip(), at=at, direction=direction or None, **params)
            elif "=" in head:
                kind, _, rate = head.partition("=")
                plan.add(kind.strip(), rate=_number(rate, item), direction=direction or None,
                         **params)
            else:
                raise FaultPlanError("a fault is kind=rate or kind@frame, not %r" % item)
        return plan

    # -- deciding --------------------------------------------------------------------------

    def decide(self, direction: str, frame: int) -> List[FaultEvent]:
        """The faults for ``frame`` of ``direction``: at most one link fault (the first rule
        that fires) and any board faults. Logged; [] while paused."""
        if not self.enabled or not self.rules:
            return []
        events: List[FaultEvent] = []
        link_decided = False
        with self._lock:
            for number, rule in enumerate(self.rules):
                is_link = rule.kind in LINK_FAULTS
                if (is_link and link_decided) or not rule.applies(direction, frame):
                    continue
                key = (number, direction)
                if rule.limit is not None and self._fired.get(key, 0) >= rule.limit:
                    continue
                rng = self._rng(number, direction, frame)
                if rule.rate is not None and rng.random() >= rule.rate:
                    continue
                self._fired[key] = self._fired.get(key, 0) + 1
                event = FaultEvent(direction, frame, rule.kind, number,
                                   tuple(sorted(rule.params.items())), rng.random(),
                                   rng.randrange(8))
                events.append(event)
                self.log.append(event)
                link_decided = link_decided or is_link
        return events

    def _rng(self, rule: int, direction: str, frame: int) -> random.Random:
        digest = hashlib.sha256(("%s|%d|%s|%d" % (self.seed, rule, direction, frame)).encode())
        return random.Random(int.from_bytes(digest.digest()[:8], "big"))

    def preview(self, direction: str, frames: int) -> List[FaultEvent]:
        """The events the plan would decide for frames 0..frames-1 of ``direction``, computed
        on a copy (this plan's log and limits are untouched)."""
        copy = FaultPlan(self.seed, self.rules)
        out: List[FaultEvent] = []
        for frame in range(frames):
            out.extend(copy.decide(direction, frame))
        return out

    def sequence(self, direction: Optional[str] = None) -> List[FaultEvent]:
        """The logged events ordered by direction then frame (thread timing removed)."""
        with self._lock:
            events = [e for e in self.log if direction is None or e.direction == direction]
        return sorted(events, key=lambda e: (e.direction, e.frame, e.rule))

    def apply_board_fault(self, event: FaultEvent) -> bool:
        """Carry out a board fault on the bound board (asynchronously); False if none bound."""
        board = self.board
        if board is None:
            return False
        if event.kind == "power_cycle":
            threading.Thread(target=_power_cycle_quietly, args=(board, event.param("off_ms")),
                             name="fault-power-cycle", daemon=True).start()
        elif event.kind == "clock_skew":
            ppm = event.param("ppm")
            offset = event.param("offset_ms")
            board.clock.skew(ppm=ppm if ppm else None, offset_ms=offset if offset else None)
        return True


def _power_cycle_quietly(board: Any, off_ms: float) -> None:
    try:
        board.power_cycle(off_ms=off_ms, wait=False)
    except Exception:  # the board was stopped meanwhile: nothing to cycle
        pass


def _number(text: str, item: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FaultPlanError("%r is not a number (in %r)" % (text, item)) from None
    return int(value) if value.is_integer() else value


def mutate(event: FaultEvent, unit: bytes, body_start: int, body_end: int
           ) -> Tuple[List[bytes], float]:
    """Apply a link fault (not disconnect) to one unit: (the chunks to send instead, delay ms).

    ``unit[body_start:body_end]`` is where corruption and truncation may act (a serial frame's
    COBS body, a TLS record's payload), so the damage is to content, not to framing alone.
    """
    if event.kind == "drop":
        return [], 0.0
    if event.kind == "duplicate":
        return [unit] * max(1, int(event.param("copies"))), 0.0
    if event.kind == "delay":
        return [unit], float(event.param("ms"))
    span = max(0, body_end - body_start)
    if event.kind == "corrupt":
        if span == 0:
            return [unit], 0.0
        position = body_start + min(span - 1, int(event.fraction * span))
        damaged = bytearray(unit)
        damaged[position] ^= 1 << event.bit
        return [bytes(damaged)], 0.0
    if event.kind == "truncate":
        cut = body_start + min(span - 1, int(event.fraction * span)) if span else body_start
        return [unit[:max(0, cut)]], 0.0
    raise FaultPlanError("mutate() does not handle %s" % event.kind)


COUNTER_FIELDS = ("frames", "delivered", "dropped", "corrupted", "truncated", "duplicated",
                  "delayed", "disconnects", "power_cycles", "clock_skews", "recovered")
_FAULT_COUNTER = {"drop": "dropped", "corrupt": "corrupted", "truncate": "truncated",
                  "duplicate": "duplicated", "delay": "delayed", "disconnect": "disconnects",
                  "power_cycle": "power_cycles", "clock_skew": "clock_skews"}


class LinkCounters:
    """Per-direction counts of what a link did (see the module rules); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_direction: Dict[str, Dict[str, int]] = {
            direction: dict.fromkeys(COUNTER_FIELDS, 0) for direction in DIRECTIONS}
        self._unrecovered = dict.fromkeys(DIRECTIONS, 0)

    def frame(self, direction: str) -> int:
        """Count a unit seen; return its number (0-based) in that direction."""
        with self._lock:
            number = self.by_direction[direction]["frames"]
            self.by_direction[direction]["frames"] = number + 1
            return number

    def fault(self, event: FaultEvent) -> None:
        """Count a fault that was carried out."""
        with self._lock:
            self.by_direction[event.direction][_FAULT_COUNTER[event.kind]] += 1
            if event.kind in LINK_FAULTS and event.kind != "delay":
                self._unrecovered[event.direction] += 1

    def delivered(self, direction: str, intact: bool, count: int = 1) -> None:
        """Count units passed on; an intact one marks earlier faults as recovered from."""
        with self._lock:
            counts = self.by_direction[direction]
            counts["delivered"] += count
            if intact and self._unrecovered[direction]:
                counts["recovered"] += self._unrecovered[direction]
                self._unrecovered[direction] = 0

    def total(self, name: str) -> int:
        """A counter summed over both directions."""
        with self._lock:
            return sum(counts[name] for counts in self.by_direction.values())

    def as_dict(self) -> Dict[str, Any]:
        """``{"up": {...}, "down": {...}, "total": {...}}``."""
        with self._lock:
            out: Dict[str, Any] = {d: dict(c) for d, c in self.by_direction.items()}
        out["total"] = {name: out["up"][name] + out["down"][name] for name in COUNTER_FIELDS}
        return out

    # The names the brief uses, as totals.
    frames_sent = property(lambda self: self.total("frames"))
    dropped = property(lambda self: self.total("dropped"))
    corrupted = property(lambda self: self.total("corrupted"))
    truncated = property(lambda self: self.total("truncated"))
    duplicated = property(lambda self: self.total("duplicated"))
    delayed = property(lambda self: self.total("delayed"))
    disconnects = property(lambda self: self.total("disconnects"))
    recovered = property(lambda self: self.total("recovered"))


def link_fault(plan: Any, direction: str, frame: int,
               counters: "LinkCounters") -> Optional[FaultEvent]:
    """Decide ``frame``'s faults with ``plan`` (a FaultPlan, or anything with its ``decide``
    and ``apply_board_fault``), carry out its board faults now (counted in ``counters``) and
    return its link fault for the link to apply, or None. Both links use this."""
    link_event: Optional[FaultEvent] = None
    for event in plan.decide(direction, frame):
        if event.kind in BOARD_FAULTS:
            if plan.apply_board_fault(event):
                counters.fault(event)
        else:
            link_event = event
    return link_event
