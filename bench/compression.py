"""The load generator's permessage-deflate jobs, on :mod:`bench.wire`'s raw client.

Run by :mod:`bench.loadgen` like its other scenarios (one JSON job in, one
JSON result out):

* ``deflate_probe``: does the server accept ``permessage-deflate``? The
  101's ``Sec-WebSocket-Extensions``, as a browser's offer gets it.
* ``wire_bytes``: one member offering deflate and one not, in one room; a
  publish of each named payload; the bytes each received on the wire for it.
* ``deflate_sweep``: per payload size, one member publishing into a room of
  its own, one message at a time: wire bytes and server CPU per message.
* ``deflate_fanout``: the ``fanout`` scenario with deflating members and
  1-2 kB dashboard updates; every member checks every message, in order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench import payloads, wire
from bench.meters import CpuMeter, publish_run

if TYPE_CHECKING:
    from bench.loadgen import Dialer

Job = dict[str, Any]
Result = dict[str, Any]

CONNECT_CONCURRENCY = 64


class Member:
    """One raw-client connection in the benchmark's JSON protocol.

    Messages after the welcome go to ``inbox`` unless ``on_room_message``
    takes them (the fan-out's members count them there instead).
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.client: wire.WireClient | None = None
        self.welcome: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.inbox: asyncio.Queue[tuple[dict[str, Any], wire.Message]] = asyncio.Queue()

    def on_message(self, client: wire.WireClient, message: wire.Message) -> None:
        if not self.welcome.done():
            msg = json.loads(message.payload)
            if msg.get("type") == "welcome":
                self.welcome.set_result(msg)
            else:
                self.welcome.set_exception(RuntimeError(f"first message was not welcome: {msg}"))
            return
        self.on_room_message(message)

    def on_room_message(self, message: wire.Message) -> None:
        self.inbox.put_nowait((json.loads(message.payload), message))

    async def expect(self, kind: str, timeout: float = 30.0) -> tuple[dict[str, Any], wire.Message]:
        """The next message of type ``kind``; an ``error`` on the way raises."""
        while True:
            msg, raw = await asyncio.wait_for(self.inbox.get(), timeout)
            if msg.get("type") == kind:
                return msg, raw
            if msg.get("type") == "error":
                raise RuntimeError(f"waiting for {kind!r}, got {msg}")

    def send(self, msg: dict[str, Any]) -> None:
        assert self.client is not None
        self.client.send_text(json.dumps(msg, separators=(",", ":")).encode())

    async def join(self, room: str) -> None:
        self.send({"type": "join", "room": room})
        await self.expect("joined")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


async def connect_member(dialer: Dialer, member: Member, offer_deflate: bool) -> Member:
    """Connect ``member`` through ``dialer``'s URL, token and source addresses; await welcome."""
    member.client = await wire.connect(
        dialer.url, dialer.headers(), offer_deflate=offer_deflate,
        on_message=member.on_message, local_addr=(dialer.next_source(), 0),
        cafile=dialer.cafile,
    )  # fmt: skip
    await asyncio.wait_for(member.welcome, 30)
    return member


async def connect_members(
    dialer: Dialer, members: Sequence[Member], offer_deflate: bool
) -> list[Member]:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(member: Member) -> Member:
        async with gate:
            return await connect_member(dialer, member, offer_deflate)

    return list(await asyncio.gather(*(one(m) for m in members)))


async def probe(job: Job, dialer: Dialer) -> Result:
    """What the server answers to a browser's permessage-deflate offer."""
    member = await connect_member(dialer, Member(), offer_deflate=True)
    assert member.client is not None
    headers = member.client.opened.result()
    await member.close()
    return {
        "offer": wire.DEFLATE_OFFER,
        "extensions": headers.get("sec-websocket-extensions"),
        "negotiated": member.client.deflate is not None,
    }


async def wire_bytes(job: Job, dialer: Dialer) -> Result:
    """Bytes on the wire for each named payload, to a deflating and a plain member."""
    room = job.get("room", "wire")
    deflating = await connect_member(dialer, Member(), offer_deflate=True)
    plain = await connect_member(dialer, Member(), offer_deflate=False)
    for member in (deflating, plain):
        await member.join(room)
    rows: list[Result] = []
    errors: list[Any] = []
    for item in job["payloads"]:
        deflating.send({"type": "publish", "room": room, "data": item["data"]})
        row: Result = {"name": item["name"], "data_bytes": payloads_size(item["data"])}
        for label, member in (("deflate", deflating), ("plain", plain)):
            msg, raw = await member.expect("message")
            if msg.get("data") != item["data"]:
                errors.append({"payload": item["name"], "member": label, "got": msg})
            row[f"{label}_wire_bytes"] = raw.wire_bytes
            row[f"{label}_compressed"] = raw.compressed
            row[f"{label}_message_bytes"] = len(raw.payload)
        row["ratio"] = row["deflate_wire_bytes"] / row["plain_wire_bytes"]
        rows.append(row)
    assert deflating.client is not None
    extensions = deflating.client.opened.result().get("sec-websocket-extensions")
    await asyncio.gather(deflating.close(), plain.close())
    return {"extensions": extensions, "payloads": rows, "errors": errors}


def payloads_size(data: Any) -> int:
    """Bytes of ``data`` as compact JSON (what the publish carried)."""
    return len(json.dumps(data, separators=(",", ":")))


async def deflate_sweep(job: Job, dialer: Dialer) -> Result:
    """Per size: ``messages`` publishes, one at a time, into the member's own room.

    Wire bytes are what the member received for each message (frame headers
    included); server CPU per message covers reading the publish, the
    publish itself and sending (and compressing) the one delivery.
    """
    member = await connect_member(dialer, Member(), offer_deflate=job["offer_deflate"])
    assert member.client is not None
    negotiated = member.client.deflate is not None
    rows: list[Result] = []
    errors: list[Any] = []
    for size in job["sizes"]:
        room = f"sweep{size}"
        await member.join(room)
        count = job["messages"]
        bodies = [payloads.sized(seq, size) for seq in range(count)]
        wire_total = message_total = compressed = 0
        meter = CpuMeter.for_job(job)
        meter.start()
        for seq, data in enumerate(bodies):
            member.send({"type": "publish", "room": room, "data": data})
            msg, raw = await member.expect("message")
            if msg.get("data") != data:
                errors.append({"size": size, "seq": seq, "got": msg})
            wire_total += raw.wire_bytes
            message_total += len(raw.payload)
            compressed += raw.compressed
        cpu = meter.stop(count)
        member.send({"type": "leave", "room": room})
        rows.append({
            "size": size,
            "data_bytes": sum(payloads_size(b) for b in bodies) / count,
            "message_bytes": message_total / count,
            "wire_bytes": wire_total / count,
            "compressed": compressed,
            "messages": count,
            **cpu,
        })  # fmt: skip
    await member.close()
    return {"negotiated": negotiated, "sizes": rows, "errors": errors}


@dataclass
class FanRun:
    """State shared by the deflating members of one fan-out run."""

    members: int
    publishes: int
    window: int
    room: str
    size: int
    delivered: int = 0
    compressed: int = 0
    wire_bytes: int = 0
    sent: int = 0
    errors: int = 0
    first_error: Any = None
    last_delivery_ns: int = 0
    seen: dict[bytes, int] = field(default_factory=dict)
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class FanMember(Member):
    """A fan-out member: checks every publish arrives once, in order."""

    def __init__(self, run: FanRun) -> None:
        super().__init__()
        self.run = run
        self.next_seq = 0
        self.publisher: FanMember | None = None
        self.joined = False

    def on_room_message(self, message: wire.Message) -> None:
        if not self.joined:
            super().on_room_message(message)
            return
        run = self.run
        # The same bytes reach every member of a publish: parse them once.
        seq = run.seen.get(message.payload)
        if seq is None:
            msg = json.loads(message.payload)
            data = msg.get("data")
            seq = data.get("seq") if isinstance(data, dict) else None
            if msg.get("type") != "message" or not isinstance(seq, int):
                run.errors += 1
                run.first_error = run.first_error or msg
                return
            run.seen[message.payload] = seq
        if seq != self.next_seq:
            run.errors += 1
            run.first_error = run.first_error or {"expected": self.next_seq, "got": seq}
            return
        self.next_seq += 1
        run.delivered += 1
        run.compressed += message.compressed
        run.wire_bytes += message.wire_bytes
        run.last_delivery_ns = time.perf_counter_ns()
        if self.publisher is self and run.sent < run.publishes:
            self.publish()
        if run.delivered == run.members * run.publishes and not run.done.done():
            run.done.set_result(None)

    def publish(self) -> None:
        run = self.run
        self.send({"type": "publish", "room": run.room,
                   "data": payloads.dashboard_update(run.sent, run.size)})  # fmt: skip
        run.sent += 1


async def deflate_fanout(job: Job, dialer: Dialer) -> Result:
    """``members`` deflating members in one room; one publishes ``publishes`` updates."""
    run = FanRun(job["members"], job["publishes"], job["window"], job.get("room", "deflate"),
                 job.get("size", 1500))  # fmt: skip
    members = await connect_members(
        dialer, [FanMember(run) for _ in range(run.members)], offer_deflate=True
    )
    negotiated = sum(1 for m in members if m.client is not None and m.client.deflate is not None)
    await asyncio.gather(*(m.join(run.room) for m in members))
    for m in members:
        m.joined = True
    publisher = members[0]
    publisher.publisher = publisher
    elapsed, cpu, timed_out = await publish_run(run, publisher, job)
    expected = run.members * run.publishes
    await asyncio.gather(*(m.close() for m in members))
    codes: dict[str, int] = {}
    for m in members:
        if m.client is not None and m.client.close_code is not None:
            codes[str(m.client.close_code)] = codes.get(str(m.client.close_code), 0) + 1
    return {
        "members": run.members,
        "publishes": run.publishes,
        "window": run.window,
        "negotiated": negotiated,
        "expected": expected,
        "delivered": run.delivered,
        "compressed_deliveries": run.compressed,
        "wire_bytes_per_delivery": run.wire_bytes / run.delivered if run.delivered else None,
        "all_delivered": run.delivered == expected and run.errors == 0,
        "timed_out": timed_out,
        "seconds": elapsed,
        "deliveries_per_s": run.delivered / elapsed if run.delivered else 0.0,
        **cpu,
        "errors": run.errors,
        "first_error": run.first_error,
        "close_codes": codes,
    }


SCENARIOS = {
    "deflate_probe": probe,
    "wire_bytes": wire_bytes,
    "deflate_sweep": deflate_sweep,
    "deflate_fanout": deflate_fanout,
}
