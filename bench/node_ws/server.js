// The Node.js `ws` baseline of `python -m bench`: a plain broadcast server.
//
//     node bench/node_ws/server.js [--host 127.0.0.1] --port N
//
// What a `ws` user writes first, speaking the JSON the load generator speaks:
// a `welcome` on open, `echo` and `ping` answered, `join` adds the connection
// to a room in this process, and `publish` serializes the message once and
// sends that one buffer to every member (the broadcast of ws's README). No
// authentication, no origin check, no limits; permessage-deflate is off, as
// it is by default in a `ws` server. `GET /healthz` answers 200 so the
// benchmark waits for start-up as it does for the other servers.
// `npm ci --prefix bench/node_ws` installs `ws` (python -m bench does it).

'use strict';

const http = require('http');
const { WebSocketServer, WebSocket } = require('ws');

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at >= 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const host = option('--host', '127.0.0.1');
const port = Number(option('--port', ''));
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node server.js [--host H] --port N');
  process.exit(2);
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end('{"status":"ok"}');
    return;
  }
  res.writeHead(404);
  res.end();
});

const wss = new WebSocketServer({ server, path: '/ws', perMessageDeflate: false });
/** room name -> Set of sockets */
const rooms = new Map();
const WELCOME = JSON.stringify({ type: 'welcome', user: 'anonymous' });

wss.on('connection', (socket) => {
  const joined = new Set();
  socket.send(WELCOME);
  socket.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (err) {
      socket.send(JSON.stringify({ type: 'error', code: 'bad_json', message: String(err) }));
      return;
    }
    let reply;
    switch (msg.type) {
      case 'ping':
        reply = { type: 'pong' };
        break;
      case 'echo':
        reply = { type: 'echo', data: msg.data };
        break;
      case 'join': {
        let members = rooms.get(msg.room);
        if (members === undefined) {
          members = new Set();
          rooms.set(msg.room, members);
        }
        members.add(socket);
        joined.add(msg.room);
        reply = { type: 'joined', room: msg.room };
        break;
      }
      case 'publish': {
        // Serialized once; the same buffer goes to every member.
        const out = Buffer.from(JSON.stringify(
          { type: 'message', room: msg.room, from: 'anonymous', data: msg.data }));
        for (const member of rooms.get(msg.room) || []) {
          if (member.readyState === WebSocket.OPEN) member.send(out, { binary: false });
        }
        return;
      }
      default:
        reply = { type: 'error', code: 'unknown_type', message: String(msg.type) };
    }
    if (msg.id !== undefined) reply.id = msg.id;
    socket.send(JSON.stringify(reply));
  });
  socket.on('close', () => {
    for (const room of joined) {
      const members = rooms.get(room);
      if (members === undefined) continue;
      members.delete(socket);
      if (members.size === 0) rooms.delete(room);
    }
  });
  socket.on('error', () => {});
});

function stop() {
  for (const socket of wss.clients) socket.terminate();
  wss.close();
  server.close(() => process.exit(0));
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

server.listen(port, host, () => {
  console.log(`node ws ${require('ws/package.json').version} listening on ws://${host}:${port}/ws`);
});
