"""The Lua scripts of :class:`~wsserver.brokers.redis.RedisBroker`.

Each broker operation that reads and writes is one script, so it is one
round trip and atomic: Redis runs scripts one at a time, which is what gives
every node the same order of a room's messages and makes the user cap a true
check-and-increment.

Key layout (``P`` is the broker's prefix, ``wsserver`` by default)::

    P:meta:ROOM      hash  epoch, offset         (rooms with history; TTL)
    P:stream:ROOM    stream of ID OFFSET-0       (rooms with history; TTL)
    P:idem:N:ROOM:K  string: first result        (N = len(ROOM); TTL)
    P:pr:ROOM        hash  NODE\\0USER -> connections of USER in ROOM on NODE
    P:pu:ROOM        hash  USER -> connections of USER in ROOM on all nodes
    P:rooms          hash  ROOM -> connections in ROOM on all nodes
    P:nr:NODE        hash  ROOM -> connections of NODE in ROOM (to clean up)
    P:ut             hash  USER -> connections of USER on all nodes
    P:un:NODE        hash  USER -> connections of USER on NODE
    P:nodes          zset  NODE scored by its heartbeat's deadline (ms, Redis clock)
    P:node:NODE      hash  stats (JSON), at (ms); TTL

    channels: P:room:ROOM (publications), P:control (disconnects, lost
    presence), P:probe:NODE (this node's readiness probe)

The presence and node scripts touch keys they derive from ``P`` (a dead node's
rooms are only known inside the script), so they need a single Redis, not a
Redis Cluster.
"""

from __future__ import annotations

#: KEYS: meta, stream, idem. ARGV: channel, message, origin header, size,
#: ttl ms, epoch candidate, idempotency ttl ms, "1" with history,
#: "1" with an idempotency key, origin (kept in the stream; "" for none).
#: Returns "" (no history) or "OFFSET EPOCH"; "=" and the first answer when
#: the idempotency key was seen (nothing published).
PUBLISH = r"""
local with_idem = ARGV[9] == "1"
if with_idem then
  local seen = redis.call("GET", KEYS[3])
  if seen then return "=" .. seen end
end
local msg = ARGV[2]
local head = " "
local result = ""
if ARGV[8] == "1" then
  local ttl = ARGV[5]
  local epoch = redis.call("HGET", KEYS[1], "epoch")
  if not epoch then
    -- Redis lost the room (TTL, restart without persistence): a new epoch
    -- tells clients holding an old position that their history is gone.
    epoch = ARGV[6]
    redis.call("DEL", KEYS[2])
    redis.call("HSET", KEYS[1], "epoch", epoch, "offset", 0)
  end
  local off = string.format("%d", redis.call("HINCRBY", KEYS[1], "offset", 1))
  msg = string.sub(msg, 1, -2) .. ',"offset":' .. off .. ',"epoch":"' .. epoch .. '"}'
  if ARGV[3] ~= "- " then
    redis.call("XADD", KEYS[2], "MAXLEN", ARGV[4], off .. "-0", "d", msg, "o", ARGV[10])
  else
    redis.call("XADD", KEYS[2], "MAXLEN", ARGV[4], off .. "-0", "d", msg)
  end
  redis.call("PEXPIRE", KEYS[1], ttl)
  redis.call("PEXPIRE", KEYS[2], ttl)
  head = off .. " " .. epoch
  result = head
end
redis.call("PUBLISH", ARGV[1], head .. " " .. ARGV[3] .. msg)
if with_idem then
  redis.call("SET", KEYS[3], result, "PX", ARGV[7])
end
return result
"""

#: KEYS: meta, stream. ARGV: ttl ms, epoch candidate, first ID ("" for the
#: position only), count ("" for no limit).
#: Returns {epoch, top} or {epoch, top, entries}.
HISTORY = r"""
local meta = redis.call("HMGET", KEYS[1], "epoch", "offset")
local epoch = meta[1]
local top = 0
if not epoch then
  epoch = ARGV[2]
  redis.call("DEL", KEYS[2])
  redis.call("HSET", KEYS[1], "epoch", epoch, "offset", 0)
  redis.call("PEXPIRE", KEYS[1], ARGV[1])
else
  top = tonumber(meta[2])
end
-- Only a publish extends the TTL: the history is kept for history_ttl after
-- the room's last message, however often it is read.
if ARGV[3] == "" then return {epoch, top} end
local entries
if ARGV[4] == "" then
  entries = redis.call("XRANGE", KEYS[2], ARGV[3], "+")
else
  entries = redis.call("XRANGE", KEYS[2], ARGV[3], "+", "COUNT", ARGV[4])
end
return {epoch, top, entries}
"""

#: KEYS: meta, stream. ARGV: the stale epoch, a new epoch, ttl ms.
#: Starts a new epoch when the room is still in the stale one (Redis lost
#: messages a node had delivered: offsets would be given out twice).
#: Returns the room's epoch after it.
RESET_EPOCH = r"""
local epoch = redis.call("HGET", KEYS[1], "epoch")
if epoch and epoch ~= ARGV[1] then return epoch end
redis.call("DEL", KEYS[2])
redis.call("HSET", KEYS[1], "epoch", ARGV[2], "offset", 0)
redis.call("PEXPIRE", KEYS[1], ARGV[3])
return ARGV[2]
"""

_DECREMENT = r"""
local function decrement(key, field, by)
  local left = redis.call("HINCRBY", key, field, -by)
  if left <= 0 then redis.call("HDEL", key, field) end
  return left
end
"""

#: KEYS: pr, pu, rooms, nr. ARGV: node, user, room. Returns the user's
#: connections in the room on all nodes.
PRESENCE_ADD = r"""
redis.call("HINCRBY", KEYS[1], ARGV[1] .. "\0" .. ARGV[2], 1)
redis.call("HINCRBY", KEYS[3], ARGV[3], 1)
redis.call("HINCRBY", KEYS[4], ARGV[3], 1)
return redis.call("HINCRBY", KEYS[2], ARGV[2], 1)
"""

#: Same keys and arguments. Returns 1 when that was the user's last
#: connection in the room on any node.
PRESENCE_REMOVE = _DECREMENT + r"""
local field = ARGV[1] .. "\0" .. ARGV[2]
local mine = tonumber(redis.call("HGET", KEYS[1], field) or "0")
-- Nothing of this node's: it was reaped as dead while cut off from Redis.
if mine <= 0 then return 0 end
decrement(KEYS[1], field, 1)
decrement(KEYS[3], ARGV[3], 1)
decrement(KEYS[4], ARGV[3], 1)
if decrement(KEYS[2], ARGV[2], 1) <= 0 then return 1 end
return 0
"""

#: KEYS: rooms. ARGV: prefix. Returns {room, connections, users, ...}.
ROOMS = r"""
local all = redis.call("HGETALL", KEYS[1])
local out = {}
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = tonumber(all[i + 1])
  out[#out + 1] = redis.call("HLEN", ARGV[1] .. ":pu:" .. all[i])
end
return out
"""

#: KEYS: ut, un. ARGV: user, limit. Returns the user's count after it, or -1
#: at the limit.
USER_CONNECT = r"""
local n = tonumber(redis.call("HGET", KEYS[1], ARGV[1]) or "0")
if n >= tonumber(ARGV[2]) then return -1 end
redis.call("HINCRBY", KEYS[2], ARGV[1], 1)
return redis.call("HINCRBY", KEYS[1], ARGV[1], 1)
"""

#: KEYS: ut, un. ARGV: user.
USER_DISCONNECT = _DECREMENT + r"""
if tonumber(redis.call("HGET", KEYS[2], ARGV[1]) or "0") <= 0 then return 0 end
decrement(KEYS[2], ARGV[1], 1)
decrement(KEYS[1], ARGV[1], 1)
return 1
"""

# Forget every entry of a node (dead, or leaving), and tell every node which
# users left which rooms with it, for their user_left events.
_REAP = _DECREMENT + r"""
local function forget(P, node, announce)
  local lost = {}
  local nr = P .. ":nr:" .. node
  local prefix = node .. "\0"
  for _, room in ipairs(redis.call("HKEYS", nr)) do
    local pr = P .. ":pr:" .. room
    local pu = P .. ":pu:" .. room
    local all = redis.call("HGETALL", pr)
    for i = 1, #all, 2 do
      local field = all[i]
      if string.sub(field, 1, #prefix) == prefix then
        local user = string.sub(field, #prefix + 1)
        local count = tonumber(all[i + 1])
        redis.call("HDEL", pr, field)
        if count > 0 then
          decrement(P .. ":rooms", room, count)
          if decrement(pu, user, count) <= 0 then lost[#lost + 1] = {room, user} end
        end
      end
    end
  end
  redis.call("DEL", nr)
  local un = P .. ":un:" .. node
  local users = redis.call("HGETALL", un)
  for i = 1, #users, 2 do
    decrement(P .. ":ut", users[i], tonumber(users[i + 1]))
  end
  redis.call("DEL", un)
  if announce and #lost > 0 then
    redis.call("PUBLISH", P .. ":control", cjson.encode({t = "lost", n = node, p = lost}))
  end
end

local function reap(P, node)
  forget(P, node, true)
  redis.call("ZREM", P .. ":nodes", node)
  redis.call("DEL", P .. ":node:" .. node)
end

local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

#: KEYS: nodes, node. ARGV: prefix, node, stats JSON, ttl ms, heartbeat ms.
#: Registers this node, reaps the nodes whose heartbeat is overdue.
#: Returns {1 if this node was registered before else 0, reaped node...}.
#:
#: A node reaps others only after its own heartbeats have reached Redis
#: without a long gap for a whole TTL ("since"): when Redis was frozen or
#: unreachable for everyone, every node is overdue at once, and the first to
#: get through must not take the others for dead (their users would "leave").
HEARTBEAT = _REAP + r"""
local now = now_ms()
local ttl = tonumber(ARGV[4])
local known = redis.call("ZSCORE", KEYS[1], ARGV[2])
local since = now
if known and now - (tonumber(known) - ttl) <= ttl - tonumber(ARGV[5]) then
  since = tonumber(redis.call("HGET", KEYS[2], "since") or now)
end
redis.call("ZADD", KEYS[1], now + ttl, ARGV[2])
redis.call("HSET", KEYS[2], "stats", ARGV[3], "at", now, "since", since)
redis.call("PEXPIRE", KEYS[2], ttl)
local out = {known and 1 or 0}
if now - since < ttl then return out end
for _, dead in ipairs(redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", now)) do
  reap(ARGV[1], dead)
  out[#out + 1] = dead
end
return out
"""

#: ARGV: prefix, node. Unregisters a node that shuts down.
LEAVE = _REAP + r"""
reap(ARGV[1], ARGV[2])
return 1
"""

#: KEYS: nodes. ARGV: prefix. Returns {now ms, name, stats, at, ...} of live nodes.
NODES = _REAP + r"""
local now = now_ms()
local out = {now}
for _, name in ipairs(redis.call("ZRANGEBYSCORE", KEYS[1], now, "+inf")) do
  local info = redis.call("HMGET", ARGV[1] .. ":node:" .. name, "stats", "at")
  if info[1] then
    out[#out + 1] = name
    out[#out + 1] = info[1]
    out[#out + 1] = info[2]
  end
end
return out
"""

#: ARGV: prefix, node, number of presence entries, then ROOM USER COUNT for
#: each, then USER COUNT for each user connection count. Replaces every
#: presence and user entry of this node with the node's own account (after
#: Redis lost them, or after an outage left commands in doubt), silently.
RESYNC = _REAP + r"""
local P, node = ARGV[1], ARGV[2]
forget(P, node, false)
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local room, user, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  redis.call("HINCRBY", P .. ":pr:" .. room, node .. "\0" .. user, count)
  redis.call("HINCRBY", P .. ":pu:" .. room, user, count)
  redis.call("HINCRBY", P .. ":rooms", room, count)
  redis.call("HINCRBY", P .. ":nr:" .. node, room, count)
  i = i + 3
end
while i <= #ARGV do
  redis.call("HINCRBY", P .. ":ut", ARGV[i], tonumber(ARGV[i + 1]))
  redis.call("HINCRBY", P .. ":un:" .. node, ARGV[i], tonumber(ARGV[i + 1]))
  i = i + 2
end
return 1
"""
