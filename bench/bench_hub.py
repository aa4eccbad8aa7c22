#!/usr/bin/env python3
"""Throughput, CPU and memory figures for the embedded fake IoT Hub, side by side with mosquitto.

Run `python bench/bench_hub.py --help`; bench/README.md explains every figure. This is a script,
not a test: it prints numbers and exits 0 unless something broke.

The hub runs in a child process of this script (`--hub-child`, below) so that the load generator
never competes with it for the interpreter, and so that its CPU time and peak RSS can be read from
/proc exactly as they are for mosquitto.
"""
import abc
import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a source checkout works without installing

from pytest_iotfailover.iothub.mqtt import Decoder, codec
from pytest_iotfailover.iothub.mqtt import packets as p
from pytest_iotfailover.iothub.mqtt.codec import encode_remaining_length
from pytest_iotfailover.sas import make_sas_token

API_VERSION = "2019-10-01"
CLK_TCK = os.sysconf("SC_CLK_TCK")
HANDSHAKE_CONCURRENCY = 64  # keeps connect bursts well under both servers' listen backlogs
MOSQUITTO_HOST = "127.0.0.3"
HUB_TARGET_RATIO = 2.0
IDLE_TARGET_KB = 50.0


class BenchError(RuntimeError):
    pass


# =============================================================================== /proc readers

def proc_cpu_seconds(pid: int) -> float:
    """CPU time (user+sys) of every thread of `pid` so far.

    /proc/<pid>/stat counts in 10 ms ticks, too coarse for sub-second runs, so the nanosecond
    run time each thread has in /proc/<pid>/task/<tid>/schedstat is preferred.
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            # a thread that just ended has no file any more
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        if total:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard  # not root: take what we may
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


_CHILDREN: list[subprocess.Popen] = []


def spawn_child(cmd: list[str], **kw) -> subprocess.Popen:
    # the benchmark's own process starts no threads before it spawns its servers
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent, **kw)  # noqa: PLW1509
    _CHILDREN.append(proc)
    return proc


def kill_children() -> None:
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(5)


def _die_with_parent() -> None:
    """preexec_fn: a child is SIGKILLed if this script dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


# =============================================================================== hub child

def acknowledge_only(hub) -> None:
    """Cut the hub's core out of the telemetry path: a PUBLISH from a connected device gets its
    PUBACK and nothing else (no rules, no ledger); every other packet takes the real core. What
    is left is the hub's own TLS and MQTT I/O layer, so bench_fair.py's `hub-io` figure sits
    between the bare floor and the whole hub and shows which of the two the gap is in."""
    from pytest_iotfailover.iothub.actions import Send
    from pytest_iotfailover.iothub.mqtt import codec
    from pytest_iotfailover.iothub.mqtt.packets import Publish

    core = hub._running_core()
    receive = core.receive

    def ack(conn, packet, now):
        if type(packet) is Publish and packet.qos == 1 and conn.device_id is not None:
            return [Send(conn, codec.encode_puback(packet.packet_id))]
        return receive(conn, packet, now)

    core.receive = ack


def hub_child_main(devices: int, profile_path: str | None, loop: str | None = None,
                   nap: float | None = None, io_only: bool = False) -> int:
    """Runs in the child: a FakeHub, driven by one-line commands on stdin, answering on stdout."""
    from pytest_iotfailover.fakehub.hub import FakeHub

    raise_nofile(devices + 1024)
    out = sys.stdout
    hub = FakeHub("benchhub", port=0, loop=loop, tier=None, nap=nap)
    hub.start()
    if io_only:
        hub._call(acknowledge_only, hub)
    profiler = None
    try:
        keys = [[f"dev{i}", hub.add_device(f"dev{i}").primary_key] for i in range(devices)]
        out.write(json.dumps({"pid": os.getpid(), "host": hub.gateway_host, "port": hub.port,
                              "hostname": hub.hostname, "ca_pem": hub.ca_pem, "devices": keys,
                              "loop": hub.loop_name}) + "\n")
        out.flush()
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "stats":
                reply = {"telemetry": None if io_only else len(hub.ledger), "connected": len(hub.connected_devices()),
                         "errors": [e.detail.get("traceback") or e.detail.get("message") for e in hub.errors]}
            elif cmd == "profile_start" and profile_path:
                import cProfile
                profiler = cProfile.Profile()
                # cProfile only sees the thread that enables it, and the hub lives on its own thread
                hub._call(profiler.enable)
                reply = {"ok": True}
            elif cmd == "profile_stop" and profiler is not None:
                hub._call(profiler.disable)
                profiler.dump_stats(profile_path)
                reply = {"ok": True, "path": profile_path}
            elif cmd == "stop":
                break
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        hub.stop()
    return 0


class ServerProcess(abc.ABC):
    """A server under test in its own process: the fake hub or mosquitto."""
    name = "?"
    proc: subprocess.Popen
    host: str
    port: int
    ca_pem: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmRSS")

    def peak_rss_kb(self) -> int:
        return proc_status_kb(self.pid, "VmHWM")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} (pid {self.pid}) exited with status {self.proc.returncode}")

    @abc.abstractmethod
    def credentials(self, index: int) -> tuple[str, str, bytes | None]:
        """(client id, user name, password) of load connection `index`."""

    def accepted(self) -> int | None:
        """How many messages the server says it accepted, when it can tell."""
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)


class HubProcess(ServerProcess):
    name = "hub"

    def __init__(self, devices: int, profile_path: str | None = None, timeout: float = 60.0,
                 loop: str | None = None, nap_ms: float | None = None, io_only: bool = False):
        cmd = [sys.executable, os.path.abspath(__file__), "--hub-child", "--devices", str(devices)]
        if io_only:
            cmd.append("--io-only")
        if nap_ms is not None:
            cmd += ["--nap", str(nap_ms)]
        if profile_path:
            cmd += ["--profile-out", profile_path]
        if loop:
            cmd += ["--loop", loop]
        self.proc = spawn_child(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        info = self._read(timeout)
        self.host, self.port = info["host"], info["port"]
        self.hostname, self.ca_pem = info["hostname"], info["ca_pem"]
        self.devices = info["devices"]
        self.loop = info.get("loop", "asyncio")
        self._tokens: dict[int, bytes] = {}

    def _read(self, timeout: float) -> dict:
        # poll, not select: with thousands of client sockets open this pipe's fd is over FD_SETSIZE
        poller = select.poll()
        poller.register(self.proc.stdout, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise BenchError(f"the hub child did not answer within {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise BenchError(f"the hub child exited (status {self.proc.returncode}) before answering")
        return json.loads(line)

    def request(self, cmd: str, timeout: float = 30.0) -> dict:
        self.check_alive()
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def credentials(self, index: int) -> tuple[str, str, bytes | None]:
        device_id, key = self.devices[index]
        token = self._tokens.get(index)
        if token is None:
            token = self._tokens[index] = make_sas_token(
                f"{self.hostname}/devices/{device_id}", key, ttl=3600).encode()
        return device_id, f"{self.hostname}/{device_id}/?api-version={API_VERSION}", token

    def accepted(self) -> int | None:
        return self.request("stats")["telemetry"]

    def stop(self) -> list[str]:
        """Stop cleanly so the hub's own error check runs; returns the errors it logged."""
        errors: list[str] = []
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                errors = self.request("stats", 10)["errors"]
            with contextlib.suppress(Exception):
                self.proc.stdin.write("stop\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return errors


# =============================================================================== mosquitto

def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return "?"
    m = re.search(r"mosquitto version (\S+)", out)
    return m.group(1) if m else "?"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class MosquittoProcess(ServerProcess):
    name = "mosquitto"

    def __init__(self, binary: str, workdir: str, timeout: float = 15.0):
        import trustme
        self.host = MOSQUITTO_HOST
        self.port = free_port(self.host)
        ca = trustme.CA(organization_name="bench CA")
        cert = ca.issue_cert(self.host)
        self.ca_pem = ca.cert_pem.bytes().decode("ascii")
        paths = {name: os.path.join(workdir, name) for name in ("ca.pem", "cert.pem", "key.pem", "mosquitto.conf")}
        ca.cert_pem.write_to_path(paths["ca.pem"])
        cert.cert_chain_pems[0].write_to_path(paths["cert.pem"])
        cert.private_key_pem.write_to_path(paths["key.pem"])
        conf = [
            "per_listener_settings false",
            "allow_anonymous true",
            "persistence false",
            # the hub (asyncio, uvloop) sets TCP_NODELAY; without it mosquitto's PUBACKs wait on Nagle
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            f"listener {self.port} {self.host}",
            f"cafile {paths['ca.pem']}",
            f"certfile {paths['cert.pem']}",
            f"keyfile {paths['key.pem']}",
            # the hub (asyncio, uvloop) sets TCP_NODELAY; without it mosquitto's PUBACKs wait on Nagle
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            # as root mosquitto would switch to user "mosquitto", who cannot read our private temp dir
            conf.insert(0, "user root")
        with open(paths["mosquitto.conf"], "w") as f:
            f.write("\n".join(conf) + "\n")
        # open for the broker's lifetime; closed in stop()
        self._log = open(os.path.join(workdir, "mosquitto.log"), "wb")  # noqa: SIM115
        self.proc = spawn_child([binary, "-c", paths["mosquitto.conf"]], stdin=subprocess.DEVNULL,
                                stdout=self._log, stderr=subprocess.STDOUT)
        self.logfile = self._log.name
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive_with_log()
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise BenchError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout:g} s")
            time.sleep(0.05)

    def check_alive_with_log(self) -> None:
        if self.proc.poll() is not None:
            with open(self.logfile, errors="replace") as f:
                log = f.read()[-2000:]
            raise BenchError(f"mosquitto exited with status {self.proc.returncode}:\n{log}")

    def credentials(self, index: int) -> tuple[str, str, bytes | None]:
        # the same CONNECT shape as for the hub, so both parse the same bytes; mosquitto ignores them
        device_id = f"dev{index}"
        return device_id, f"benchhub.azure-devices.net/{device_id}/?api-version={API_VERSION}", b"x" * 150

    def stop(self) -> list[str]:
        self.kill()
        self._log.close()
        return []


# =============================================================================== load generator

class PublishEncoder:
    """QoS 1 PUBLISH bytes for one device, without a packet object per message.

    The generator must be cheaper per message than the server it measures; codec.encode is the
    reference it is checked against at start-up.
    """

    def __init__(self, device_id: str, payload: bytes):
        self.prefix = f"devices/{device_id}/messages/events/%24.mid=".encode()
        self.payload = payload

    def encode(self, n: int, packet_id: int) -> bytes:
        topic = self.prefix + str(n).encode() + b"&a=1"
        tl = len(topic)
        return (b"\x32" + encode_remaining_length(tl + 4 + len(self.payload)) + struct.pack("!H", tl) + topic
                + struct.pack("!H", packet_id) + self.payload)


def check_encoder() -> None:
    enc = PublishEncoder("devX", b"\x00{payload}" * 20)
    for n, pid in ((1, 1), (99999, 65535), (123, 300)):
        topic = f"devices/devX/messages/events/%24.mid={n}&a=1"
        want = codec.encode(p.Publish(topic, enc.payload, 1, pid))
        if enc.encode(n, pid) != want:
            raise BenchError("the load generator's PUBLISH encoder disagrees with mqtt.codec")


class Client(asyncio.Protocol):
    """One device: TLS on a MemoryBIO (asyncio's SSL transport costs 256 KiB per connection),
    CONNECT, then `total` QoS 1 PUBLISHes with at most `window` of them un-acknowledged."""

    def __init__(self, server: ServerProcess, index: int, ctx: ssl.SSLContext, payload: bytes,
                 keep_alive: int):
        self.device_id, self.username, self.password = server.credentials(index)
        self.host = server.host
        self.ctx = ctx
        self.keep_alive = keep_alive
        self.encoder = PublishEncoder(self.device_id, payload)
        self.loop = asyncio.get_running_loop()
        self.connected = self.loop.create_future()
        self.finished = self.loop.create_future()
        self.transport = None
        self.handshaken = False
        self.connacked = False
        self.decoder = Decoder()
        self.rx = bytearray()
        self.total = self.window = self.sent = self.acked = 0
        self.tls_version = self.cipher = None

    # --- asyncio -----------------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.inbio, self.outbio = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = self.ctx.wrap_bio(self.inbio, self.outbio, server_side=False, server_hostname=self.host)
        self._handshake()

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
                    raise BenchError("server closed the TLS session")
                if self.connacked:
                    self.rx += chunk
                else:
                    self._before_connack(chunk)
            if self.rx:
                self._on_pubacks()
        except (BenchError, ssl.SSLError, codec.ProtocolError) as exc:
            self._fail(exc)
        self._flush()

    def connection_lost(self, exc):
        why = BenchError(f"{self.device_id}: connection lost ({exc or 'closed by server'}) "
                         f"after {self.acked}/{self.total} acks")
        self._fail(why)

    # --- MQTT --------------------------------------------------------------------------------

    def _handshake(self):
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self._flush()
            self._fail(exc)
            return
        self.handshaken = True
        self.tls_version, self.cipher = self.tls.version(), self.tls.cipher()[0]
        self.tls.write(codec.encode(p.Connect(self.device_id, self.keep_alive, True, self.username,
                                              self.password)))
        self._flush()

    def _before_connack(self, chunk):
        for packet in self.decoder.feed(chunk):
            if packet.type != p.CONNACK or packet.return_code != p.CONNACK_ACCEPTED:
                raise BenchError(f"{self.device_id}: CONNECT refused: {packet!r}")
            self.connacked = True
            if not self.connected.done():
                self.connected.set_result(None)
        if self.connacked and self.decoder.buffered:
            raise BenchError(f"{self.device_id}: unexpected bytes after CONNACK")

    def _on_pubacks(self):
        # Nothing but 4-byte PUBACKs may follow CONNACK, so check them with slices, not a loop
        rx = self.rx
        n = len(rx) // 4
        if not n:
            return
        end = 4 * n
        if rx[0:end:4] != b"\x40" * n or rx[1:end:4] != b"\x02" * n:
            raise BenchError(f"{self.device_id}: expected only PUBACKs, got {bytes(rx[:16])!r}")
        del rx[:end]
        self.acked += n
        if self.acked > self.sent:
            raise BenchError(f"{self.device_id}: {self.acked} PUBACKs for {self.sent} PUBLISHes")
        if self.acked == self.total:
            if not self.finished.done():
                self.finished.set_result(None)
        else:
            self._send_more()

    def start_sending(self, total: int, window: int):
        self.total, self.window = total, window
        if total == 0:
            self.finished.set_result(None)
            return
        self._send_more()
        self._flush()

    def _send_more(self):
        stop = min(self.total, self.acked + self.window)
        if stop <= self.sent:
            return
        enc = self.encoder.encode
        self.tls.write(b"".join([enc(n, n % 65535 + 1) for n in range(self.sent, stop)]))
        self.sent = stop

    def _flush(self):
        out = self.outbio.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _fail(self, exc):
        for fut in (self.connected, self.finished):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # a failure before anyone awaits is still reported, not warned about
        if self.transport is not None:
            self.transport.abort()

    def close(self):
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self.tls.write(codec.encode(p.Disconnect()))
                self._flush()
            self.transport.close()


async def wait_all(aws, timeout: float, what: str) -> None:
    """Like wait_for(gather()), but the first failure wins and nothing is left running or unretrieved."""
    futs = [asyncio.ensure_future(a) for a in aws]
    try:
        done, pending = await asyncio.wait(futs, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                raise fut.exception()
        if pending:
            raise BenchError(f"{what}: {len(pending)} of {len(futs)} unfinished after {timeout:g} s")
    finally:
        for fut in futs:
            fut.cancel()
        await asyncio.gather(*futs, return_exceptions=True)


def client_context(ca_pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def open_clients(server: ServerProcess, count: int, payload: bytes, keep_alive: int,
                       timeout: float) -> list[Client]:
    ctx = client_context(server.ca_pem)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(HANDSHAKE_CONCURRENCY)
    clients: list[Client] = []

    async def one(i: int) -> None:
        async with gate:
            _, client = await loop.create_connection(
                lambda: Client(server, i, ctx, payload, keep_alive), server.host, server.port)
            clients.append(client)
            await client.connected

    try:
        await wait_all([one(i) for i in range(count)], timeout, f"{server.name}: connecting")
    except BaseException:
        close_clients(clients)
        raise
    return clients


def close_clients(clients: list[Client]) -> None:
    for c in clients:
        c.close()


# =============================================================================== measurements

def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def throughput_run(server: ServerProcess, connections: int, messages: int, window: int,
                         payload: bytes, timeout: float, hub_profile: bool = False) -> dict:
    clients = await open_clients(server, connections, payload, 600, timeout)
    try:
        await asyncio.sleep(0.2)  # let TLS session tickets and CONNECT bookkeeping settle
        if hub_profile:
            server.request("profile_start")
        server.check_alive()
        cpu0, t0, me0 = server.cpu(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        for client, share in zip(clients, split(messages, connections)):
            client.start_sending(share, window)
        await wait_all([c.finished for c in clients], timeout, f"{server.name}: sending")
        t1, cpu1, me1 = time.perf_counter(), server.cpu(), resource.getrusage(resource.RUSAGE_SELF)
        if hub_profile:
            server.request("profile_stop")
        tls = f"{clients[0].tls_version} {clients[0].cipher}"
    finally:
        close_clients(clients)
    accepted = server.accepted()
    if accepted is not None and accepted != messages:
        raise BenchError(f"{server.name} acknowledged {messages} messages but recorded {accepted}")
    wall = t1 - t0
    client_cpu = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
    return {"server": server.name, "connections": connections, "messages": messages, "wall": wall,
            "msgs_per_s": messages / wall, "cpu_us_per_msg": (cpu1 - cpu0) / messages * 1e6,
            "server_cpu_pct": (cpu1 - cpu0) / wall * 100, "client_cpu_pct": client_cpu / wall * 100,
            "peak_rss_mb": server.peak_rss_kb() / 1024, "tls": tls}


async def idle_run(server: ServerProcess, count: int, timeout: float) -> dict:
    await asyncio.sleep(0.2)
    before = server.rss_kb()
    clients = await open_clients(server, count, b"", 600, timeout)
    try:
        await asyncio.sleep(1.0)  # the server finishes its share of each handshake after CONNACK
        server.check_alive()
        after = server.rss_kb()
        if server.name == "hub":
            connected = server.request("stats")["connected"]
            if connected != count:
                raise BenchError(f"hub reports {connected} connected devices, expected {count}")
    finally:
        close_clients(clients)
    return {"server": server.name, "count": count, "before_mb": before / 1024, "after_mb": after / 1024,
            "kb_per_conn": (after - before) / count}


# =============================================================================== reporting

def print_profile(path: str, messages: int, top: int = 20) -> None:
    import pstats
    stats = pstats.Stats(path)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)
    total = sum(v[2] for _, v in stats.stats.items())
    print(f"\nhub hot path, cProfile on the hub thread ({messages} messages; cProfile inflates "
          f"small functions, so read shares, not absolute times)")
    print(f"  {'own µs/msg':>10} {'share':>6} {'calls/msg':>9}  function")
    for (filename, line, func), (cc, nc, tt, ct, _) in rows[:top]:
        where = f"{os.path.basename(filename)}:{line}" if line else filename
        print(f"  {tt / messages * 1e6:10.2f} {tt / total * 100:5.1f}% {nc / messages:9.2f}  {func} ({where})")
    print(f"  {total / messages * 1e6:10.2f} 100.0%            total profiled time on the hub thread")
    # inclusive view of the hub's own layers (and TLS), to see which stage the own times add up to
    ours = [(k, v) for k, v in stats.stats.items()
            if "pytest_iotfailover" in k[0] or "_ssl" in k[2] or "urllib" in k[0]]
    ours.sort(key=lambda kv: kv[1][3], reverse=True)
    print(f"  {'incl µs/msg':>10} {'share':>6}  function (including what it calls)")
    for (filename, line, func), (cc, nc, tt, ct, _) in ours[:12]:
        where = f"{os.path.basename(filename)}:{line}" if line else filename
        print(f"  {ct / messages * 1e6:10.2f} {ct / total * 100:5.1f}%  {func} ({where})")


def fmt_ratio(hub: float, mosq: float) -> str:
    return f"{hub / mosq:.1f}x" if mosq > 0 else "n/a"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--connections", default="1,10,100",
                    help="comma-separated connection counts, one throughput run each")
    ap.add_argument("--messages", type=int, default=100_000, help="QoS 1 messages per throughput run")
    ap.add_argument("--window", type=int, default=100, help="un-acknowledged PUBLISHes allowed per connection")
    ap.add_argument("--payload", type=int, default=64, help="message body size in bytes")
    ap.add_argument("--idle", type=int, default=2000, help="idle connections for the memory figure (0: skip)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 and 10 connections, 2000 messages, 200 idle connections")
    ap.add_argument("--no-mosquitto", action="store_true", help="benchmark the hub only")
    ap.add_argument("--mosquitto", default="mosquitto", help="mosquitto binary")
    ap.add_argument("--profile", action="store_true",
                    help="also print the hub's top costs per message (cProfile, largest connection count)")
    ap.add_argument("--timeout", type=float, default=600.0, help="limit for the whole run, seconds")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="asyncio",
                    help="event loop of the hub process (bench_fair.py compares both)")
    ap.add_argument("--hub-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    ap.add_argument("--nap", type=float, default=None, help=argparse.SUPPRESS)  # ms; FakeHub(nap=) in s
    ap.add_argument("--io-only", action="store_true", help=argparse.SUPPRESS)  # acknowledge_only()
    args = ap.parse_args(argv)
    if args.quick:
        args.connections, args.messages, args.idle = "1,10", 2000, 200
    try:
        args.connection_counts = [int(x) for x in args.connections.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--connections must be comma-separated integers, got {args.connections!r}")
    if not args.connection_counts or min(args.connection_counts) < 1:
        ap.error("--connections needs positive counts")
    if args.window < 1 or args.window > 65000:
        ap.error("--window must be 1-65000 (MQTT packet ids are 16 bits)")
    if args.messages < max(args.connection_counts):
        ap.error("--messages must be at least the largest connection count")
    if args.idle < 0 or args.payload < 0:
        ap.error("--idle and --payload must be non-negative")
    return args


async def bench(args, workdir: str) -> int:
    payload = (b'{"seq":0,"temperature":21.5,"humidity":40,"pad":"' + b"x" * args.payload)[:args.payload]
    phase_timeout = max(60.0, args.messages / 500)
    binary = None if args.no_mosquitto else shutil.which(args.mosquitto)

    def spawn(kind: str, devices: int = 0, profile_path: str | None = None) -> ServerProcess:
        if kind == "hub":
            return HubProcess(devices, profile_path, loop=args.loop)
        return MosquittoProcess(binary, workdir)

    def retire(server: ServerProcess) -> None:
        errors = server.stop()
        if errors:
            raise BenchError(f"{server.name} logged errors:\n" + "\n".join(map(str, errors)))

    print(f"pytest-iotfailover hub benchmark: Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{args.messages} QoS 1 messages per run, window {args.window}, payload {args.payload} B")
    if binary:
        print(f"mosquitto {mosquitto_version(binary)} ({binary}) on {MOSQUITTO_HOST}")
    elif args.no_mosquitto:
        print("mosquitto: skipped (--no-mosquitto)")
    else:
        print(f"mosquitto: skipped, {args.mosquitto!r} is not installed "
              "(Debian/Ubuntu: apt-get install -y mosquitto)")

    runs: list[dict] = []
    kinds = ["hub"] + (["mosquitto"] if binary else [])
    print("\nthroughput: each run has its own freshly started server process")
    print(f"{'server':<10} {'conns':>5} {'msgs/s':>9} {'µs CPU/msg':>10} {'server CPU':>10} "
          f"{'client CPU':>10} {'peak RSS MB':>11}  TLS")
    for n in args.connection_counts:
        for kind in kinds:
            server = spawn(kind, devices=n)
            try:
                r = await throughput_run(server, n, args.messages, args.window, payload, phase_timeout)
            finally:
                retire(server)
            runs.append(r)
            print(f"{r['server']:<10} {n:>5} {r['msgs_per_s']:>9.0f} {r['cpu_us_per_msg']:>10.1f} "
                  f"{r['server_cpu_pct']:>9.0f}% {r['client_cpu_pct']:>9.0f}% {r['peak_rss_mb']:>11.1f}  "
                  f"{r['tls']}", flush=True)

    if binary:
        print(f"\nCPU per message, hub vs mosquitto (target: hub <= {HUB_TARGET_RATIO:g}x mosquitto)")
        print(f"{'conns':>5} {'hub µs':>8} {'mosquitto µs':>12} {'ratio':>7}  verdict")
        for n in args.connection_counts:
            h = next(r for r in runs if r["server"] == "hub" and r["connections"] == n)
            m = next(r for r in runs if r["server"] == "mosquitto" and r["connections"] == n)
            ok = m["cpu_us_per_msg"] > 0 and h["cpu_us_per_msg"] <= HUB_TARGET_RATIO * m["cpu_us_per_msg"]
            print(f"{n:>5} {h['cpu_us_per_msg']:>8.1f} {m['cpu_us_per_msg']:>12.1f} "
                  f"{fmt_ratio(h['cpu_us_per_msg'], m['cpu_us_per_msg']):>7}  {'met' if ok else 'MISSED'}",
                  flush=True)

    if args.idle:
        print(f"\nidle connections: {args.idle} devices connected (CONNACK received), then idle "
              f"(target: hub <= {IDLE_TARGET_KB:g} KB each)")
        print(f"{'server':<10} {'count':>5} {'RSS before MB':>13} {'RSS after MB':>12} {'KB/conn':>8}")
        for kind in kinds:
            server = spawn(kind, devices=args.idle)
            try:
                r = await idle_run(server, args.idle, phase_timeout)
            finally:
                retire(server)
            verdict = "" if kind != "hub" else ("  met" if r["kb_per_conn"] <= IDLE_TARGET_KB else "  MISSED")
            print(f"{r['server']:<10} {r['count']:>5} {r['before_mb']:>13.1f} {r['after_mb']:>12.1f} "
                  f"{r['kb_per_conn']:>8.1f}{verdict}", flush=True)

    if args.profile:
        n = max(args.connection_counts)
        path = os.path.join(workdir, "hub.prof")
        server = spawn("hub", devices=n, profile_path=path)
        try:
            await throughput_run(server, n, args.messages, args.window, payload, phase_timeout,
                                 hub_profile=True)
        finally:
            retire(server)
        print_profile(path, args.messages)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hub_child:
        return hub_child_main(args.devices, args.profile_out, args.loop,
                              None if args.nap is None else args.nap / 1000, args.io_only)
    check_encoder()
    raise_nofile(max(args.idle, max(args.connection_counts)) + 1024)
    # SIGTERM takes the same clean-up path as an exception
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # backstop for a blocking call that outlives --timeout: the default SIGALRM action ends this
    # process, and the servers follow through PR_SET_PDEATHSIG
    signal.alarm(int(args.timeout) + 120)
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as workdir:
        try:
            return asyncio.run(asyncio.wait_for(bench(args, workdir), args.timeout))
        except TimeoutError:
            print(f"bench_hub: gave up after --timeout {args.timeout:g} s", file=sys.stderr)
            return 2
        except BenchError as exc:
            print(f"bench_hub: {exc}", file=sys.stderr)
            return 1
        finally:
            kill_children()


if __name__ == "__main__":
    sys.exit(main())
