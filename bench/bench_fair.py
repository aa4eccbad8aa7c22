#!/usr/bin/env python3
"""CPU per message of the fake hub, mosquitto and a bare asyncio TLS floor, at equal offered load.

Run `python bench/bench_fair.py --help`; bench/README.md explains every figure. This is a script,
not a test: it prints numbers and exits 0 unless something broke.

Why another script: bench_hub.py sends as fast as acknowledgements come back, so the server that
is cheaper per message is the one whose load generator runs out of CPU first, and a server that is
not saturated wakes up more often for fewer messages each time, which raises its cost per message.
Here every server gets the same offered load: either paced (a fixed rate, one TLS record per
message, as devices send) or batched at saturation (many PUBLISHes per TLS record, from several
generator processes, so that the generator is not the limit). Each figure says which process
was busy, so a figure limited by the generator or by the rest of the machine can be seen as such.
"""
import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # a source checkout works without installing

import bench_hub as bh

from pytest_iotfailover.iothub.mqtt import Decoder, codec
from pytest_iotfailover.iothub.mqtt import packets as p

PACED_TARGET = 1.5   # hub µs CPU/msg at most this many times mosquitto's, paced
BATCHED_TARGET = 2.0  # and batched
FLOOR_HOST = "127.0.0.1"
BUSY = 85.0  # % of one core from which a process counts as the limit


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
        return True
    except ImportError:
        return False


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def machine_busy_seconds() -> float:
    """CPU time every process on the machine spent so far (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / bh.CLK_TCK


def python_speed_ms() -> float:
    """Milliseconds a fixed piece of pure-Python work takes on this machine right now, best of 3.

    A machine can run slower without any process in sight being busy (a neighbour outside the
    container, a lower clock), and that costs an interpreted server more than mosquitto: three
    runs of one commit gave hub/mosquitto 1.4x in one and 2.3x in another (bench/README.md). This
    figure, taken before every run, shows which runs met a slower machine."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        counts: dict[int, int] = {}
        for i in range(20_000):
            counts[i & 255] = counts.get(i & 255, 0) + i
        best = min(best, time.perf_counter() - t0)
    return best * 1000


# =============================================================================== floor server

class FloorProtocol(asyncio.BufferedProtocol):
    """Just enough MQTT to CONNACK a CONNECT and PUBACK a QoS 1 PUBLISH, on the hub's TLS setup.

    It mirrors the hub's I/O shape (ssl.MemoryBIO on a BufferedProtocol reading into one shared
    buffer, reading TLS only while bytes are pending, every reply of one wake-up in one TLS write),
    so the difference to the hub is the hub's own MQTT and IoT Hub work.
    """
    read_view = memoryview(bytearray(256 * 1024))  # one loop per floor process

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.buf = bytearray()
        self.handshaken = False

    def get_buffer(self, sizehint):
        return self.read_view

    def buffer_updated(self, nbytes):
        self.data_received(bytes(self.read_view[:nbytes]))

    def connection_made(self, transport):
        self.transport = transport
        self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.ctx.wrap_bio(self.inbio, self.outbio, server_side=True)

    def data_received(self, data):
        self.inbio.write(data)
        if not self.handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except ssl.SSLError:
                self.transport.abort()
                return
            self.handshaken = True
        while self.inbio.pending or self.tls.pending():
            try:
                chunk = self.tls.read(16384)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                self.transport.close()
                return
            if not chunk:
                self.transport.close()
                return
            self.buf += chunk
        replies = self._parse()
        if replies:
            self.tls.write(b"".join(replies))
        self._flush()

    def _parse(self) -> list[bytes]:
        buf, i, n, replies = self.buf, 0, len(self.buf), []
        while n - i >= 2:
            length, mult, j, complete = 0, 1, i + 1, False
            while j < n and j - i <= 4:
                b = buf[j]
                j += 1
                length += (b & 0x7F) * mult
                mult <<= 7
                if not b & 0x80:
                    complete = True
                    break
            if not complete:
                if j - i > 4:  # a remaining length over 4 bytes is not MQTT
                    self.transport.abort()
                    n = i
                break
            if j + length > n:
                break
            kind = buf[i] >> 4
            if kind == 3:
                if (buf[i] >> 1) & 3:
                    tl = (buf[j] << 8) | buf[j + 1]
                    replies.append(b"\x40\x02" + bytes(buf[j + 2 + tl:j + 4 + tl]))
            elif kind == 1:
                replies.append(b"\x20\x02\x00\x00")
            elif kind == 12:
                replies.append(b"\xd0\x00")
            elif kind == 14:
                self.transport.close()
            i = j + length
        del buf[:i]
        return replies

    def _flush(self):
        out = self.outbio.read()
        if out:
            self.transport.write(out)


def floor_child_main(loop_name: str) -> int:
    from pytest_iotfailover.fakehub.certs import HubCertificates

    bh.raise_nofile(4096)
    # the hub's own certificate setup, so both negotiate the same protocol and cipher
    certs = HubCertificates(["benchhub.azure-devices.net", "localhost", FLOOR_HOST])
    ctx = certs.server_context()
    loop = new_loop(loop_name)
    server = loop.run_until_complete(
        loop.create_server(lambda: FloorProtocol(ctx), FLOOR_HOST, 0, backlog=4096))
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"pid": os.getpid(), "host": FLOOR_HOST, "port": port, "ca_pem": certs.ca_pem,
                      "loop": loop_name}), flush=True)
    # the parent closes our stdin to stop us
    loop.add_reader(sys.stdin.fileno(), loop.stop)
    loop.run_forever()
    server.close()
    loop.close()
    return 0


class FloorProcess(bh.ServerProcess):
    name = "floor"

    def __init__(self, loop_name: str, timeout: float = 30.0):
        self.proc = bh.spawn_child([sys.executable, os.path.abspath(__file__), "--floor-child", "--loop", loop_name],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = _readline(self.proc, timeout, "floor server")
        info = json.loads(line)
        self.host, self.port, self.ca_pem, self.loop = info["host"], info["port"], info["ca_pem"], info["loop"]

    def credentials(self, index: int) -> tuple[str, str, bytes | None]:
        device_id = f"dev{index}"
        return device_id, f"benchhub.azure-devices.net/{device_id}/?api-version={bh.API_VERSION}", b"x" * 150

    def stop(self) -> list[str]:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(10)
        self.kill()
        return []


def _readline(proc: subprocess.Popen, timeout: float, what: str) -> str:
    import select
    poller = select.poll()
    poller.register(proc.stdout, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise bh.BenchError(f"{what} did not answer within {timeout:g} s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise bh.BenchError(f"{what} exited (status {proc.returncode}) before answering")
    return line


# =============================================================================== load generator child

class GenClient(asyncio.Protocol):
    """One device connection of a generator process: TLS on MemoryBIO, CONNECT, then either one
    PUBLISH per TLS record when the pacer says so, or batches of pre-built PUBLISHes."""

    def __init__(self, cfg: dict, cred: list, ctx: ssl.SSLContext, loop):
        self.client_id, self.username, password = cred
        self.password = password.encode("latin-1") if password is not None else None
        self.cfg, self.ctx, self.loop = cfg, ctx, loop
        self.payload = cfg["payload_bytes"]
        self.encoder = bh.PublishEncoder(self.client_id, self.payload)
        self.connected = loop.create_future()
        self.transport = None
        self.handshaken = self.connacked = False
        self.decoder = Decoder()
        self.rx = bytearray()
        self.sent = self.acked = 0
        self.inflight = collections.deque()  # scheduled send time of each un-acknowledged message
        self.backlog = collections.deque()   # scheduled but held back by the window
        self.latencies: list[float] = []
        self.batches: list[bytes] = []
        self.next_batch = self.partial = 0
        self.sending = False
        self.error: BaseException | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.ctx.wrap_bio(self.inbio, self.outbio, server_side=False, server_hostname=self.cfg["host"])
        self._handshake()

    def _handshake(self):
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self.handshaken = True
        self.tls_info = f"{self.tls.version()} {self.tls.cipher()[0]}"
        self.tls.write(codec.encode(p.Connect(self.client_id, 600, True, self.username, self.password)))
        self._flush()

    def data_received(self, data):
        self.inbio.write(data)
        try:
            if not self.handshaken:
                self._handshake()
                if not self.handshaken:
                    return
            while True:
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                if not chunk:
                    raise bh.BenchError("server closed the TLS session")
                if self.connacked:
                    self.rx += chunk
                else:
                    for packet in self.decoder.feed(chunk):
                        if packet.type != p.CONNACK or packet.return_code != p.CONNACK_ACCEPTED:
                            raise bh.BenchError(f"{self.client_id}: CONNECT refused: {packet!r}")
                        self.connacked = True
                        self.connected.done() or self.connected.set_result(None)
            if self.rx:
                self._on_pubacks()
        except (bh.BenchError, ssl.SSLError, codec.ProtocolError) as exc:
            self._fail(exc)
        self._flush()

    def connection_lost(self, exc):
        if self.sending or not self.connected.done():
            self._fail(bh.BenchError(f"{self.client_id}: connection lost ({exc or 'closed by server'}) "
                                     f"after {self.acked}/{self.sent} acks"))

    def _on_pubacks(self):
        rx = self.rx
        n = len(rx) // 4
        if not n:
            return
        end = 4 * n
        if rx[0:end:4] != b"\x40" * n or rx[1:end:4] != b"\x02" * n:
            raise bh.BenchError(f"{self.client_id}: expected only PUBACKs, got {bytes(rx[:16])!r}")
        del rx[:end]
        self.acked += n
        if self.acked > self.sent:
            raise bh.BenchError(f"{self.client_id}: {self.acked} PUBACKs for {self.sent} PUBLISHes")
        if self.batches:
            self.partial += n
            while self.partial >= self.batch_size:
                self.partial -= self.batch_size
                self.inflight.popleft()
                if self.sending:
                    self._send_batch()
            return
        now = self.loop.time()
        lat = self.latencies
        for _ in range(n):
            lat.append(now - self.inflight.popleft())
        while self.backlog and len(self.inflight) < self.cfg["window"]:
            self._publish(self.backlog.popleft(), flush=False)

    # --- paced: one message, one TLS record, one write ---------------------------------------

    def offer(self, scheduled: float):
        if len(self.inflight) >= self.cfg["window"]:
            self.backlog.append(scheduled)
        else:
            self._publish(scheduled, flush=True)

    def _publish(self, scheduled: float, flush: bool):
        n = self.sent
        self.tls.write(self.encoder.encode(n, n % 65535 + 1))
        self.sent += 1
        self.inflight.append(scheduled)
        if flush:
            self._flush()

    # --- batched: pre-built batches, a fixed number in flight ---------------------------------

    def start_batches(self, batch: int, depth: int):
        # packet ids run over depth * batch distinct values, so none is reused while in flight;
        # the bytes are built once so that the generator costs little more than TLS per message
        self.batch_size = batch
        self.batches = [b"".join(self.encoder.encode(k * batch + i, k * batch + i + 1) for i in range(batch))
                        for k in range(depth)]
        self.sending = True
        for _ in range(depth):
            self._send_batch()
        self._flush()

    def _send_batch(self):
        self.tls.write(self.batches[self.next_batch])
        self.next_batch = (self.next_batch + 1) % len(self.batches)
        self.sent += self.batch_size
        self.inflight.append(None)

    # ------------------------------------------------------------------------------------------

    def _flush(self):
        out = self.outbio.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _fail(self, exc):
        if self.error is None:
            self.error = exc
        if not self.connected.done():
            self.connected.set_exception(exc)
            self.connected.exception()
        if self.transport is not None:
            self.transport.abort()

    def close(self):
        self.sending = False
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.tls.write(codec.encode(p.Disconnect()))
                self._flush()
            self.transport.close()


async def gen_run(cfg: dict) -> None:
    loop = asyncio.get_running_loop()
    out = sys.stdout
    ctx = bh.client_context(cfg["ca_pem"])
    gate = asyncio.Semaphore(bh.HANDSHAKE_CONCURRENCY)
    clients: list[GenClient] = []

    async def one(cred):
        async with gate:
            _, c = await loop.create_connection(lambda: GenClient(cfg, cred, ctx, loop), cfg["host"], cfg["port"])
            clients.append(c)
            await c.connected

    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await bh.wait_all([one(c) for c in cfg["creds"]], cfg["timeout"], "connecting")
    out.write(json.dumps({"ready": True, "tls": clients[0].tls_info}) + "\n")
    out.flush()
    if (await stdin.readline()).strip() != b"go":
        return
    t0 = loop.time()
    duration = cfg["duration"]
    late = 0
    if cfg["mode"] == "paced":
        rate = cfg["rate"]
        total = int(rate * duration)
        n = len(clients)
        i = 0
        while i < total:
            now = loop.time()
            due = min(total, int((now - t0) * rate) + 1)
            while i < due:
                scheduled = t0 + i / rate
                if now - scheduled > 0.005:
                    late += 1
                clients[i % n].offer(scheduled)
                i += 1
            if i < total:
                # at least 1 ms: uvloop's timers have millisecond resolution, and a shorter sleep
                # would spin the generator on zero-length timers instead of sleeping
                await asyncio.sleep(max(0.001, t0 + i / rate - loop.time()))
        send_end = loop.time()
        sent = total
    else:
        for c in clients:
            c.start_batches(cfg["batch"], cfg["depth"])
        await asyncio.sleep(duration)
        send_end = loop.time()
        for c in clients:
            c.sending = False
        sent = sum(c.sent for c in clients)
    deadline = loop.time() + cfg["timeout"]
    while any(c.acked < c.sent for c in clients) and loop.time() < deadline:
        if any(c.error for c in clients):
            break
        await asyncio.sleep(0.005)
    t_end = loop.time()
    errors = [str(c.error) for c in clients if c.error]
    acked = sum(c.acked for c in clients)
    if not errors and acked < sum(c.sent for c in clients):
        errors.append(f"{sum(c.sent for c in clients) - acked} messages unacknowledged after {cfg['timeout']:g} s")
    lat = sorted(x for c in clients for x in c.latencies)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None

    out.write(json.dumps({"sent": sum(c.sent for c in clients), "acked": acked, "send_s": send_end - t0,
                          "total_s": t_end - t0, "late": late, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                          "errors": errors, "offered": sent}) + "\n")
    out.flush()
    await stdin.readline()  # "close"
    for c in clients:
        c.close()
    await asyncio.sleep(0.05)


def gen_child_main(loop_name: str) -> int:
    bh.raise_nofile(4096)
    cfg = json.loads(sys.stdin.readline())
    cfg["payload_bytes"] = cfg["payload"].encode("latin-1")
    loop = new_loop(loop_name)
    try:
        loop.run_until_complete(gen_run(cfg))
    except bh.BenchError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    finally:
        loop.close()
    return 0


class Generator:
    def __init__(self, loop_name: str, cfg: dict):
        self.proc = bh.spawn_child([sys.executable, os.path.abspath(__file__), "--gen-child", "--loop", loop_name],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict:
        msg = json.loads(_readline(self.proc, timeout, "a load generator"))
        if "error" in msg:
            raise bh.BenchError(f"load generator: {msg['error']}")
        return msg

    def send(self, line: str):
        with contextlib.suppress(OSError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def stop(self):
        self.send("close")
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()


# =============================================================================== one measurement

class BaselineHubProcess(bh.HubProcess):
    """The hub of another source tree (`--baseline DIR`), so that a change's before and after are
    measured interleaved in one run, under the same load on the machine."""
    name = "base"

    def __init__(self, tree: str, devices: int, loop: str, timeout: float = 60.0):
        script = os.path.join(tree, "bench", "bench_hub.py")
        # bench_hub.py puts its own tree first on sys.path, so the child imports that tree's hub
        cmd = [sys.executable, script, "--hub-child", "--devices", str(devices), "--loop", loop]
        self.proc = bh.spawn_child(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        info = self._read(timeout)
        self.host, self.port = info["host"], info["port"]
        self.hostname, self.ca_pem = info["hostname"], info["ca_pem"]
        self.devices = info["devices"]
        self.loop = info.get("loop", "asyncio")
        self._tokens = {}


NAPPING_SERVERS = ("hub/asyncio", "hub/uvloop", "hub-io/asyncio", "hub-io/uvloop")  # take @<ms>
SERVERS = NAPPING_SERVERS + ("floor/asyncio", "floor/uvloop", "mosquitto", "base/asyncio", "base/uvloop")


def is_nap_kind(kind: str) -> bool:
    """hub/<loop>@<ms>: this tree's hub with FakeHub(nap=<ms> / 1000), 0 for none (plain hub/<loop>
    runs with the default nap; bench/README.md, "Coalescing wake-ups")."""
    base, at, ms = kind.partition("@")
    if not at or base not in NAPPING_SERVERS:
        return False
    try:
        return 0 <= float(ms) <= 50  # FakeHub's maximum, fakehub/nap.py
    except ValueError:
        return False


def spawn_server(kind: str, devices: int, workdir: str, mosquitto: str | None,
                 baseline: str | None = None) -> bh.ServerProcess:
    name, _, loop = kind.partition("/")
    loop, _, nap = loop.partition("@")
    if name in ("hub", "hub-io"):
        return bh.HubProcess(devices, loop=loop, nap_ms=float(nap) if nap else None, io_only=name == "hub-io")
    if name == "base":
        assert baseline is not None  # main() refuses base/* without --baseline
        return BaselineHubProcess(baseline, devices, loop)
    if name == "floor":
        return FloorProcess(loop)
    return bh.MosquittoProcess(mosquitto, workdir)


def run_one(kind: str, scenario: dict, args, workdir: str) -> dict:
    conns, gens = scenario["conns"], scenario["generators"]
    speed_ms = python_speed_ms()  # before any server or generator runs
    server = spawn_server(kind, conns, workdir, args.mosquitto_path, args.baseline)
    generators: list[Generator] = []
    try:
        payload = (b'{"seq":0,"temperature":21.5,"humidity":40,"pad":"' + b"x" * args.payload)[:args.payload]
        creds = []
        for i in range(conns):
            cid, user, pw = server.credentials(i)
            creds.append([cid, user, pw.decode("latin-1") if isinstance(pw, bytes) else pw])
        for g in range(gens):
            cfg = {"host": server.host, "port": server.port, "ca_pem": server.ca_pem, "creds": creds[g::gens],
                   "mode": scenario["mode"], "rate": (scenario.get("rate") or 0) / gens,
                   "duration": args.duration, "window": args.window, "batch": args.batch, "depth": args.depth,
                   "payload": payload.decode("latin-1"), "timeout": args.phase_timeout}
            generators.append(Generator(args.gen_loop, cfg))
        tls = None
        for g in generators:
            tls = g.read(args.phase_timeout)["tls"]
        # session tickets and CONNECT bookkeeping settle before the clock starts, and the hub
        # naps again only a second after its last new connection (fakehub/server.py, take_nap)
        time.sleep(1.2)
        server.check_alive()
        pids = [g.proc.pid for g in generators]
        cpu0, gcpu0, m0, t0 = server.cpu(), [bh.proc_cpu_seconds(x) for x in pids], machine_busy_seconds(), \
            time.perf_counter()
        for g in generators:
            g.send("go")
        results = [g.read(args.duration + args.phase_timeout + 30) for g in generators]
        t1, cpu1, gcpu1, m1 = time.perf_counter(), server.cpu(), [bh.proc_cpu_seconds(x) for x in pids], \
            machine_busy_seconds()
        errors = [e for r in results for e in r["errors"]]
        if errors:
            raise bh.BenchError(f"{kind}: " + "; ".join(errors[:3]))
        acked = sum(r["acked"] for r in results)
        for g in generators:
            g.stop()
        generators = []
        accepted = server.accepted()
        if accepted is not None and accepted != acked:
            raise bh.BenchError(f"{kind}: acknowledged {acked} messages but recorded {accepted}")
    finally:
        for g in generators:
            g.stop()
        errs = server.stop()
    if errs:
        raise bh.BenchError(f"{kind} logged errors:\n" + "\n".join(map(str, errs)))
    wall = t1 - t0
    send_s = max(r["send_s"] for r in results)
    server_cpu = cpu1 - cpu0
    gen_cpu = [b - a for a, b in zip(gcpu0, gcpu1)]
    ours = server_cpu + sum(gen_cpu)
    lat50 = [r["p50_ms"] for r in results if r["p50_ms"] is not None]
    lat99 = [r["p99_ms"] for r in results if r["p99_ms"] is not None]
    return {
        "kind": kind, "acked": acked, "wall": wall, "rate": acked / wall,
        "offered": scenario.get("rate"), "send_rate": sum(r["sent"] for r in results) / send_s,
        "us_per_msg": server_cpu / acked * 1e6,
        "server_pct": server_cpu / wall * 100, "gen_pct": [c / wall * 100 for c in gen_cpu],
        "gen_us_per_msg": sum(gen_cpu) / acked * 1e6,
        "others_pct": max(0.0, (m1 - m0) - ours) / wall * 100,
        "late": sum(r["late"] for r in results),
        "p50_ms": max(lat50) if lat50 else None, "p99_ms": max(lat99) if lat99 else None,
        "tls": tls, "speed_ms": speed_ms,
    }


def limit_of(r: dict, scenario: dict) -> str:
    """What held this figure back."""
    paced = scenario["mode"] == "paced"
    busy = [(r["server_pct"], "server")] + [(g, f"generator {i + 1}") for i, g in enumerate(r["gen_pct"])]
    top_pct, top = max(busy)
    if paced and r["rate"] >= 0.97 * scenario["rate"]:
        return "offered load (kept up)"
    if top_pct >= BUSY:
        return f"{top} saturated"
    if r["others_pct"] > 50:
        return f"machine busy (others {r['others_pct']:.0f}%)"
    return "none saturated (latency-bound)"


# =============================================================================== reporting

def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def fx(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def scenario_label(s: dict) -> str:
    if s["mode"] == "paced":
        return f"paced {s['rate']:,} msg/s, {s['conns']} conns"
    return f"batched, saturation, {s['conns']} conns"


def kept_up(r: dict) -> bool:
    return r["offered"] is None or r["rate"] >= 0.97 * r["offered"]


def summarise(rows: list[dict]) -> dict:
    """Median over repeats, and the spread, of the runs that got the offered load.

    A paced run that fell behind (a starved generator, a busy machine) sent fewer messages per
    wake-up than offered, which makes the server look cheaper; it is left out and counted. When
    no run kept up, all of them are used and marked.
    """
    good = [r for r in rows if kept_up(r)]
    vals = [r["us_per_msg"] for r in (good or rows)]
    return {"med": statistics.median(vals), "lo": min(vals), "hi": max(vals),
            "dropped": len(rows) - len(good) if good else None, "n": len(rows)}


def fmt_summary(m: dict) -> str:
    text = f"{m['med']:.1f} [{m['lo']:.1f}-{m['hi']:.1f}]"
    if m["dropped"] is None:
        text += " !"
    elif m["dropped"]:
        text += f" -{m['dropped']}"
    return text


def print_run(r: dict, scenario: dict) -> None:
    gens = "+".join(f"{g:.0f}" for g in r["gen_pct"])
    paced = scenario["mode"] == "paced"
    lat = f"{fmt(r['p50_ms'], '.1f')}/{fmt(r['p99_ms'], '.1f')}" if paced else "-"
    late = f"{r['late'] / max(1, r['acked']) * 100:.0f}%" if paced else "-"
    print(f"  {r['kind']:<14} {r['rate']:>9.0f} {r['us_per_msg']:>10.1f} {r['server_pct']:>7.0f}% "
          f"{gens + '%':>11} {r['gen_us_per_msg']:>7.1f} {r['others_pct']:>7.0f}% {lat:>11} {late:>5}  "
          f"{limit_of(r, scenario)}", flush=True)


def ratio(a: dict | None, b: dict | None) -> float | None:
    if a is None or b is None or b["med"] <= 0:
        return None
    return a["med"] / b["med"]


def print_summary(scenarios: list[dict], results: dict[tuple[int, str], list[dict]], kinds: list[str],
                  repeats: int) -> None:
    print(f"\nsummary: µs server CPU per message, median of {repeats} run(s) [min-max]; paced runs that "
          "fell 3% or more behind the offered rate are left out (-n: n runs left out; !: none kept up, all used)")
    cols = [k for k in kinds]
    print(f"  {'scenario':<34}" + "".join(f"{k:>22}" for k in cols))
    for si, s in enumerate(scenarios):
        line = f"  {scenario_label(s):<34}"
        for k in cols:
            rows = results.get((si, k))
            line += (fmt_summary(summarise(rows)) if rows else "-").rjust(22)
        print(line)
    have = set(kinds)
    loops = [lp for lp in ("asyncio", "uvloop") if f"hub/{lp}" in have]
    # hub/<loop>@<ms>: that hub with its nap set to <ms> milliseconds (bench_hub.py --nap)
    hubs = [k for k in kinds if k.startswith("hub/")]
    print("\nratios of those medians (target: hub <= "
          f"{PACED_TARGET:g}x mosquitto paced, <= {BATCHED_TARGET:g}x batched)")
    header = f"  {'scenario':<34} {'hub':<14} {'hub/mosquitto':>13} {'hub/floor':>9} {'floor/mosquitto':>15}  verdict"
    print(header)
    for si, s in enumerate(scenarios):
        mosq = summarise(results[(si, "mosquitto")]) if results.get((si, "mosquitto")) else None
        for hk in hubs:
            lp = hk[4:].partition("@")[0]
            hub = summarise(results[(si, hk)]) if results.get((si, hk)) else None
            floor = summarise(results[(si, f"floor/{lp}")]) if results.get((si, f"floor/{lp}")) else None
            target = PACED_TARGET if s["mode"] == "paced" else BATCHED_TARGET
            hm, hf, fm = ratio(hub, mosq), ratio(hub, floor), ratio(floor, mosq)
            verdict = "-" if hm is None else ("met" if hm <= target else "MISSED")
            if any(m is not None and m["dropped"] is None for m in (hub, mosq, floor)):
                verdict += " (a server never got the offered load: run again on a quieter machine)"
            print(f"  {scenario_label(s):<34} {hk[4:]:<14} {fx(hm):>13} {fx(hf):>9} {fx(fm):>15}  {verdict}")
    print_split(scenarios, results, have)
    print_speed(results)
    base_loops = [lp for lp in loops if f"base/{lp}" in have]
    if base_loops:
        print("\nthis tree's hub against --baseline's (below 1: this one is cheaper)")
        for si, s in enumerate(scenarios):
            for lp in base_loops:
                hub = summarise(results[(si, f"hub/{lp}")]) if results.get((si, f"hub/{lp}")) else None
                base = summarise(results[(si, f"base/{lp}")]) if results.get((si, f"base/{lp}")) else None
                print(f"  {scenario_label(s):<34} {lp:<8} hub/base {fx(ratio(hub, base)):>7}")


def print_speed(results: dict[tuple[int, str], list[dict]]) -> None:
    speeds = [r["speed_ms"] for rows in results.values() for r in rows]
    if not speeds:
        return
    lo, hi = min(speeds), max(speeds)
    print(f"\nmachine speed: a fixed pure-Python loop took {lo:.2f}-{hi:.2f} ms before the runs ({hi / lo:.2f}x); "
          "the machine's speed changed by about that much during this run, and a slower machine costs the hub "
          "more than mosquitto, so read the ratios with that spread")


def print_split(scenarios: list[dict], results: dict[tuple[int, str], list[dict]], have: set[str]) -> None:
    """floor -> hub-io -> hub: what the hub's own I/O layer adds to a bare server, and what its core
    (IoT Hub's rules and the ledger) adds to that (bench_hub.acknowledge_only)."""
    loops = [lp for lp in ("asyncio", "uvloop") if {f"floor/{lp}", f"hub-io/{lp}", f"hub/{lp}"} <= have]
    if not loops:
        return
    print("\nwhere the hub's cost sits (µs server CPU per message, medians): the bare floor, the hub's own "
          "I/O layer with a core that only acknowledges (hub-io), the whole hub")
    for si, s in enumerate(scenarios):
        for lp in loops:
            fl, io, hub = (summarise(results[(si, f"{k}/{lp}")]) if results.get((si, f"{k}/{lp}")) else None
                           for k in ("floor", "hub-io", "hub"))
            if fl is None or io is None or hub is None:
                continue
            print(f"  {scenario_label(s):<34} {lp:<8} floor {fmt(fl['med']):>6}  hub-io {fmt(io['med']):>6} "
                  f"({fmt(io['med'] - fl['med'], '+.1f')} the I/O layer)  hub {fmt(hub['med']):>6} "
                  f"({fmt(hub['med'] - io['med'], '+.1f')} the core)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rates", default="2000,20000", help="paced offered loads, messages/s, comma-separated")
    ap.add_argument("--connections", default="10,100", help="connection counts, comma-separated")
    ap.add_argument("--no-batched", action="store_true", help="skip the batched saturation runs")
    ap.add_argument("--no-paced", action="store_true", help="skip the paced runs")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of sending per run")
    ap.add_argument("--servers", default=None,
                    help="comma-separated of hub/asyncio, hub/uvloop, floor/asyncio, floor/uvloop, mosquitto "
                         "(default: all that are installed but hub-io); hub/<loop>@<ms>: that hub with "
                         "FakeHub(nap=<ms> ms), @0 without napping; hub-io/<loop>[@<ms>]: the hub's I/O layer "
                         "with a core that only acknowledges telemetry")
    ap.add_argument("--generators", default="auto",
                    help="load generator processes per run: a number, or auto (1 paced below 10,000 msg/s, "
                         "else 2)")
    ap.add_argument("--gen-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="event loop of the generators (auto: uvloop when installed, as it is cheaper)")
    ap.add_argument("--window", type=int, default=1000, help="paced: un-acknowledged PUBLISHes per connection "
                                                             "before the generator holds messages back")
    ap.add_argument("--batch", type=int, default=50, help="batched: PUBLISHes per TLS write")
    ap.add_argument("--depth", type=int, default=2, help="batched: batches in flight per connection")
    ap.add_argument("--payload", type=int, default=64, help="message body size in bytes")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every figure, interleaved; medians reported")
    ap.add_argument("--mosquitto", default="mosquitto", help="mosquitto binary")
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="another source tree (e.g. `git worktree add DIR main`): adds servers base/asyncio "
                         "and base/uvloop, its hub, interleaved with this one's")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 s runs, 200 msg/s, 10 connections")
    ap.add_argument("--timeout", type=float, default=1800.0, help="limit for the whole run, seconds")
    ap.add_argument("--floor-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gen-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.connections, args.duration = "200", "10", 1.0
    try:
        args.rate_list = [int(x) for x in args.rates.split(",") if x.strip()]
        args.conn_list = [int(x) for x in args.connections.split(",") if x.strip()]
    except ValueError:
        ap.error("--rates and --connections must be comma-separated integers")
    if min(args.rate_list + args.conn_list, default=0) < 1 or not args.conn_list:
        ap.error("--rates and --connections need positive numbers")
    if args.batch < 1 or args.depth < 1 or args.batch * args.depth > 65000 or not 1 <= args.window <= 65000:
        ap.error("--batch x --depth and --window must stay within MQTT's 65535 packet ids")
    if args.duration <= 0 or args.repeat < 1:
        ap.error("--duration must be positive and --repeat at least 1")
    if args.generators != "auto" and not (args.generators.isdigit() and int(args.generators) >= 1):
        ap.error("--generators must be a positive number or auto")
    args.phase_timeout = 60.0
    if args.gen_loop == "auto":
        args.gen_loop = "uvloop" if have_uvloop() else "asyncio"
    elif args.gen_loop == "uvloop" and not have_uvloop():
        ap.error("--gen-loop uvloop: uvloop is not installed")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.floor_child:
        return floor_child_main(args.loop)
    if args.gen_child:
        return gen_child_main(args.loop)
    bh.check_encoder()
    bh.raise_nofile(4096)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.alarm(int(args.timeout) + 120)

    binary = shutil.which(args.mosquitto)
    args.mosquitto_path = binary
    available = ["hub/asyncio", "hub-io/asyncio", "floor/asyncio"] \
        + (["hub/uvloop", "hub-io/uvloop", "floor/uvloop"] if have_uvloop() else []) \
        + (["mosquitto"] if binary else [])
    if args.baseline:
        if not os.path.isfile(os.path.join(args.baseline, "bench", "bench_hub.py")):
            print(f"bench_fair: --baseline {args.baseline}: no bench/bench_hub.py there", file=sys.stderr)
            return 2
        available += ["base/asyncio"] + (["base/uvloop"] if have_uvloop() else [])
    if args.servers:
        kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
        unknown = [k for k in kinds if k not in SERVERS and not is_nap_kind(k)]
        if unknown:
            print(f"bench_fair: unknown --servers {', '.join(unknown)}", file=sys.stderr)
            return 2
        missing = [k for k in kinds if k.partition("@")[0] not in available]
        if missing:
            print(f"bench_fair: not installed: {', '.join(missing)} (uvloop: pip install '.[fast]'; "
                  "mosquitto: apt-get install -y mosquitto)", file=sys.stderr)
            return 2
    else:
        order = ["hub/asyncio", "hub/uvloop", "base/asyncio", "base/uvloop", "floor/asyncio", "floor/uvloop",
                 "mosquitto"]
        kinds = [k for k in order if k in available]

    scenarios: list[dict] = []
    for conns in ([] if args.no_paced else args.conn_list):
        for rate in args.rate_list:
            gens = int(args.generators) if args.generators != "auto" else (1 if rate < 10_000 else 2)
            scenarios.append({"mode": "paced", "rate": rate, "conns": conns, "generators": min(gens, conns)})
    if not args.no_batched:
        for conns in args.conn_list:
            gens = int(args.generators) if args.generators != "auto" else 2
            scenarios.append({"mode": "batched", "conns": conns, "generators": min(gens, conns)})

    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"pytest-iotfailover fair benchmark: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(load)}; {args.duration:g} s per run, payload {args.payload} B, "
          f"generators on {args.gen_loop}")
    print(f"mosquitto {bh.mosquitto_version(binary)} ({binary})" if binary else
          "mosquitto: not installed (Debian/Ubuntu: apt-get install -y mosquitto); no ratios to it")
    if not have_uvloop():
        print("uvloop: not installed (pip install '.[fast]'); asyncio only")
    print("paced: one PUBLISH per TLS record and per write, spread evenly over the connections; "
          f"batched: {args.batch} PUBLISHes per TLS write, {args.depth} writes in flight per connection")

    results: dict[tuple[int, str], list[dict]] = collections.defaultdict(list)
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="bench-fair-") as workdir:
        try:
            for si, s in enumerate(scenarios):
                print(f"\n{scenario_label(s)}, {s['generators']} generator process(es)")
                print(f"  {'server':<14} {'msgs/s':>9} {'µs CPU/msg':>10} {'server':>8} {'generators':>11} "
                      f"{'gen µs':>7} {'others':>8} {'p50/p99 ms':>11} {'late':>5}  limit")
                for rep in range(args.repeat):
                    for kind in kinds:
                        if time.monotonic() > deadline:
                            print(f"bench_fair: gave up after --timeout {args.timeout:g} s", file=sys.stderr)
                            return 2
                        r = run_one(kind, s, args, workdir)
                        results[(si, kind)].append(r)
                        print_run(r, s)
            tls = {r["tls"] for rows in results.values() for r in rows}
            print(f"\nTLS negotiated: {', '.join(sorted(t for t in tls if t))}")
            print_summary(scenarios, results, kinds, args.repeat)
        except bh.BenchError as exc:
            print(f"bench_fair: {exc}", file=sys.stderr)
            return 1
        finally:
            bh.kill_children()
    return 0


if __name__ == "__main__":
    sys.exit(main())
