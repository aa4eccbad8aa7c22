"""The hub's host name for `region_failover(dns=True)`, resolved inside this process.

The Python device SDK (paho-mqtt under azure-iot-device) resolves the host it dials with
`socket.create_connection`, that is with `socket.getaddrinfo`, in the device's own process. A
hub started with `FakeHub(dns=True)` hands its devices a host name of its own (GatewayHostName in
their connection strings) and `socket.getaddrinfo` is replaced, for as long as at least one such
hub runs, by a function that answers that name (and only that name) with the hub's current
loopback address and passes every other call to the original unchanged. The last hub to stop
puts the original back. No root, no /etc/hosts, no other process is affected — which is also why
the standalone hub (`iotfailover-hub`) cannot offer it: its devices run in other processes.

What is not covered: resolvers that do not go through `socket.getaddrinfo` of this process
(uvloop's own `getaddrinfo`, C extensions, child processes such as `iothub_fleet`'s workers).

`HubName` is one hub's name and its failover history: where the name points, which addresses
are dark. Every answer is worked out from the faults' own start and end times, so no timer is
needed to move the name and a failover scheduled with `at=` or `after_messages=` moves it when
it really starts. A dns failover that never starts - refused because it overlaps another outage,
or cancelled while pending - stops listening on its secondary address at once (`drop_move`,
event `dns_listener_closed`), rather than holding the address until the hub stops.
"""
from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# RFC 6761: `.invalid` never resolves anywhere, so a name that escapes this process (a child
# process, another resolver) fails at once instead of reaching some real host
DNS_SUFFIX = "iotfailover.invalid"

_lock = threading.Lock()
_answers: dict[str, Callable[[], str]] = {}
_original: Callable[..., Any] | None = None
_numbers = itertools.count(1)


def _patched_getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                         flags: int = 0) -> Any:
    # a caller may hold on to this function after the original was put back
    original = _original or _patched_getaddrinfo.__wrapped__  # type: ignore[attr-defined]
    answer = None
    if isinstance(host, (str, bytes)):
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        answer = _answers.get(name.rstrip(".").lower())  # one dict read: safe without the lock
    if answer is not None:
        host = answer()
    return original(host, port, family, type, proto, flags)


def install(name: str, answer: Callable[[], str]) -> None:
    """Resolve `name` with `answer()` in this process from now on (thread-safe)."""
    global _original
    key = name.lower()
    with _lock:
        if key in _answers:
            raise ValueError(f"host name {name!r} is already resolved by another running hub")
        _answers[key] = answer
        if _original is None:
            _original = socket.getaddrinfo
            _patched_getaddrinfo.__wrapped__ = _original  # type: ignore[attr-defined]
            socket.getaddrinfo = _patched_getaddrinfo


def uninstall(name: str) -> None:
    """Stop resolving `name`; with no name left, `socket.getaddrinfo` is the original again."""
    global _original
    with _lock:
        _answers.pop(name.lower(), None)
        if _answers or _original is None:
            return
        if socket.getaddrinfo is _patched_getaddrinfo:
            socket.getaddrinfo = _original
            _original = None
        # else someone wrapped ours since: taking ours out would remove theirs too, so it stays,
        # answering nothing of its own (the table is empty), and is reused by the next install


def resolved_names() -> list[str]:
    with _lock:
        return sorted(_answers)


def new_name(hub_name: str) -> str:
    """A host name no other hub of this process has: several hubs may share one hub_name."""
    return f"{hub_name}-{next(_numbers)}.{DNS_SUFFIX}"


@dataclass
class _Move:
    fault: Any      # the engine's Fault: started_at / ended_at are set on the hub thread
    new: str        # the secondary region's address, listening from the time it was scheduled
    stale: float
    sock: Any = None   # its listening socket
    task: Any = None   # the loop's task that starts serving it (set on the hub thread)


class HubName:
    """One hub's name: its addresses and the dns failovers that move it. Thread-safe."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._first: str | None = None
        self._moves: list[_Move] = []
        self._tasks: set[Any] = set()

    def start(self, address: str) -> None:
        self._first = address
        install(self.name, self.resolve)

    def stop(self) -> None:
        uninstall(self.name)

    def add_move(self, fault: Any, new: str, stale: float, sock: Any = None) -> _Move:
        move = _Move(fault, new, stale, sock)
        with self._lock:
            self._moves.append(move)
        return move

    def pop_unstarted(self, fault: Any) -> _Move | None:
        """Forget `fault`'s move if the fault never started (and so never moved the name)."""
        with self._lock:
            for move in self._moves:
                if move.fault is fault and fault.started_at is None:
                    self._moves.remove(move)
                    return move
        return None

    @property
    def listening(self) -> list[str]:
        """Every address the hub serves for this name: the first, then each dns failover's."""
        with self._lock:
            return [self._first_address(), *(m.new for m in self._moves)]

    def _started(self) -> list[_Move]:
        with self._lock:
            return [m for m in self._moves if m.fault.started_at is not None]

    @property
    def address(self) -> str:
        """Where the hub answers: the secondary address of the last dns failover that started."""
        started = self._started()
        return started[-1].new if started else self._first_address()

    def _first_address(self) -> str:
        if self._first is None:
            raise RuntimeError("the FakeHub is not running (use `with FakeHub() as hub:` or hub.start())")
        return self._first

    def resolve(self, now: float | None = None) -> str:
        """What the name resolves to now: the old address during the outage and `dns_stale` s
        after it, then the new one."""
        started = self._started()
        if not started:
            return self._first_address()
        last = started[-1]
        old = started[-2].new if len(started) > 1 else self._first_address()
        ended = last.fault.ended_at
        if ended is None or (time.time() if now is None else now) < ended + last.stale:
            return old
        return last.new

    def is_dark(self, address: str) -> bool:
        """An address of this hub that is not (or not yet) where it answers."""
        return address != self.address

    def attach(self, server: Any, address: str, events: Any) -> None:
        """Called as the hub starts listening on `address`: resolve the name, darken what is not
        served, and log each connection refused at a dark address (`connect_refused`, how "dns")."""
        self.start(address)
        server.dark = self.is_dark
        server.on_dark = lambda local, peer: events.add("connect_refused", None, reason="region_failover",
                                                        how="dns", address=local, peer=peer, name=self.name)


def prepare_move(hub: Any, fault: Any, stale: float) -> None:
    """Before `fault` (a region_failover with dns=True) is scheduled: listen on the secondary
    region's address, so the hub answers there once the fault starts."""
    name: HubName | None = getattr(hub, "dns", None)
    if name is None:
        raise ValueError("dns=True needs a hub whose devices dial it by name: start it with FakeHub(dns=True) "
                         "(the plugin: --iothub-dns); this hub hands out its address in GatewayHostName, "
                         "which no name lookup can move")
    if not hub.running:
        raise RuntimeError("the FakeHub is not running (use `with FakeHub() as hub:` or hub.start())")
    from .server import HubServer
    sock = HubServer.bind(None, hub.port)
    new = sock.getsockname()[0]
    loop, server = hub._loop, hub._server

    def _served(task: Any) -> None:
        name._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            sock.close()
            loop.call_exception_handler({"message": f"cannot serve the dns failover's address {new}",
                                         "exception": task.exception()})

    move = name.add_move(fault, new, stale, sock)

    def serve() -> None:
        move.task = task = loop.create_task(server.serve(sock))
        name._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(_served)

    # the kernel queues connections on the bound socket until the loop accepts them
    loop.call_soon_threadsafe(serve)


def drop_move(hub: Any, fault: Any, why: str) -> str | None:
    """`fault` (a dns failover) will never start: close the listener of its secondary address now
    and log `dns_listener_closed`. The address, or None when `fault` has no move that never started."""
    name: HubName | None = getattr(hub, "dns", None)
    move = None if name is None else name.pop_unstarted(fault)
    if name is None or move is None:
        return None
    if not hub.running:
        move.sock.close()  # the stopped hub closed its listeners; this one may never have served
    elif threading.get_ident() == hub._thread.ident:
        hub._loop.create_task(_close_listener(hub._server, move))  # waiting here would stall the loop
    else:
        asyncio.run_coroutine_threadsafe(_close_listener(hub._server, move), hub._loop).result(30)
    hub.event_log.add("dns_listener_closed", None, address=move.new, reason=why, name=name.name)
    return move.new


async def _close_listener(server: Any, move: _Move) -> None:
    # serve() ran before this (both queued on the loop, in order); its task may still be starting
    if move.task is not None and not move.task.done():
        await asyncio.wait([move.task])
    fileno = move.sock.fileno()
    for listener in list(server._servers):
        if fileno != -1 and any(s.fileno() == fileno for s in listener.sockets):
            server._servers.remove(listener)
            listener.close()  # closes the listening socket at once; nothing was accepted there to keep
            return
    move.sock.close()
