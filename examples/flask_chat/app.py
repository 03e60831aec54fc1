"""A Flask app with cookie sessions whose chat runs on wsserver, through the proxies.

The app knows nothing of JWTs. Users log in with a form; Flask keeps who they
are in its signed ``session`` cookie. The browser then opens a WebSocket to
wsserver, which sends the cookie to this app's ``/wsserver/connect`` and gets
the user back; joins of ``team:`` rooms, publishes to ``chat:`` rooms and the
page's ``rpc`` calls come here too. See docs/backend.md.

Run it (two terminals; see README.md beside this file)::

    python examples/flask_chat/app.py --port 5000
    python -m wsserver --config examples/flask_chat/wsserver.toml

Environment: ``FLASK_SECRET_KEY`` (signs the session cookie),
``WSSERVER_PROXY_KEY_FILE`` (the same file wsserver reads with
``--proxy-key-file``; calls without that key are refused), ``WS_URL`` (the
WebSocket URL the page connects to, default ``ws://localhost:8888/ws``).
"""

from __future__ import annotations

import argparse
import hmac
import os
import secrets
import time
from collections.abc import Callable
from functools import wraps
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify, redirect, render_template_string, request, session
from itsdangerous import BadSignature

app = Flask(__name__)
app.secret_key = os.environ.get("FLASK_SECRET_KEY") or secrets.token_urlsafe(32)
app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")
SESSION_SECONDS = 3600

#: The key wsserver sends as X-Wsserver-Proxy-Key (None: accept any caller; dev only).
_key_file = os.environ.get("WSSERVER_PROXY_KEY_FILE")
PROXY_KEY = Path(_key_file).read_text().strip() if _key_file else None

#: Who is in which team (a real app asks its database).
TEAMS = {"team:red": {"alice", "carol"}, "team:blue": {"bob"}}
BANNED_WORDS = ("darn", "heck")


# --- the pages ------------------------------------------------------------------

PAGE = """<!doctype html>
<title>Flask chat on wsserver</title>
{% if user %}
<p>Logged in as <b>{{ user }}</b>.
<form method=post action=/logout style="display:inline"><button>Log out</button></form></p>
<div id=log style="height:20em;overflow:auto;border:1px solid #ccc"></div>
<input id=text placeholder="say something"> <button id=send>Send</button>
<script>
const log = (line) => { const p = document.createElement("div"); p.textContent = line;
  document.getElementById("log").append(p); };
// No token anywhere: the browser sends the session cookie with the handshake,
// wsserver asks this app who that is (POST /wsserver/connect).
const ws = new WebSocket({{ ws_url|tojson }});
ws.onopen = () => ws.send(JSON.stringify({type: "join", room: "chat:lobby"}));
ws.onmessage = (event) => {
  const msg = JSON.parse(event.data);
  if (msg.type === "message") log(`${msg.from}: ${msg.data.text}`);
  else if (msg.type === "error") log(`(${msg.code}: ${msg.message})`);
  else if (msg.type === "welcome") log(`connected as ${msg.user}`);
};
ws.onclose = (event) => log(`closed ${event.code} ${event.reason}`);
document.getElementById("send").onclick = () => {
  const input = document.getElementById("text");
  ws.send(JSON.stringify({type: "publish", room: "chat:lobby", data: {text: input.value}}));
  input.value = "";
};
</script>
{% else %}
<form method=post action=/login><input name=user placeholder="your name" required>
<button>Log in</button></form>
{% endif %}
"""


@app.get("/")
def index() -> str:
    return render_template_string(PAGE, user=session.get("user"),
                                  ws_url=os.environ.get("WS_URL", "ws://localhost:8888/ws"))


@app.post("/login")
def login() -> Any:
    user = (request.form.get("user") or (request.get_json(silent=True) or {}).get("user") or "")
    user = user.strip()[:64]
    if not user.isprintable() or not user:
        abort(400)
    session.clear()
    session["user"] = user
    session["since"] = int(time.time())
    return redirect("/", code=303)


@app.post("/logout")
def logout() -> Any:
    session.clear()
    return redirect("/", code=303)


# --- what wsserver asks ---------------------------------------------------------------


def from_wsserver(view: Callable[[dict[str, Any]], Any]) -> Callable[[], Any]:
    """Only wsserver may call the proxy endpoints: it proves itself with the shared key."""

    @wraps(view)
    def checked() -> Any:
        if PROXY_KEY is not None:
            sent = request.headers.get("X-Wsserver-Proxy-Key", "")
            if not hmac.compare_digest(sent.encode(), PROXY_KEY.encode()):
                abort(403)
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400)
        return jsonify(view(body))

    return checked


def user_of_cookie_header(cookie_header: str) -> str | None:
    """The user in Flask's session cookie, read the way Flask reads it."""
    cookie = SimpleCookie()
    cookie.load(cookie_header)
    morsel = cookie.get(app.config.get("SESSION_COOKIE_NAME", "session"))
    if morsel is None:
        return None
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    try:
        data = serializer.loads(morsel.value, max_age=SESSION_SECONDS)
    except BadSignature:
        return None
    user = data.get("user")
    return user if isinstance(user, str) else None


@app.post("/wsserver/connect")
@from_wsserver
def ws_connect(body: dict[str, Any]) -> Any:
    user = user_of_cookie_header(body.get("headers", {}).get("Cookie", ""))
    if user is None:
        return {"disconnect": {"code": 4003, "reason": "log in first"}}
    # Chat rooms are open to every logged-in user (see wsserver.toml); the
    # personal room too. The connection lives as long as the session.
    return {"result": {"user": user, "expires_at": int(time.time()) + SESSION_SECONDS,
                       "rooms": [f"user:{user}"]}}


@app.post("/wsserver/subscribe")
@from_wsserver
def ws_subscribe(body: dict[str, Any]) -> Any:
    if body["user"] in TEAMS.get(body["room"], set()):
        return {"result": {}}
    return {"error": {"code": "forbidden", "message": "you are not in that team"}}


@app.post("/wsserver/publish")
@from_wsserver
def ws_publish(body: dict[str, Any]) -> Any:
    data = body["data"]
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text.strip():
        return {"error": {"code": "bad_request", "message": "send {\"text\": ...}"}}
    if len(text) > 500:
        return {"error": {"code": "bad_request", "message": "at most 500 characters"}}
    for word in BANNED_WORDS:
        text = text.replace(word, "*" * len(word))
    # Moderated and enriched: every member gets the clean text and the server time.
    return {"result": {"data": {"text": text, "at": int(time.time())}}}


@app.post("/wsserver/rpc")
@from_wsserver
def ws_rpc(body: dict[str, Any]) -> Any:
    if body["method"] == "whoami":
        return {"result": {"data": {"user": body["user"]}}}
    if body["method"] == "my_teams":
        teams = sorted(room for room, users in TEAMS.items() if body["user"] in users)
        return {"result": {"data": teams}}
    return {"error": {"code": "not_found", "message": f"no method {body['method']!r}"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args()
    # Flask's development server; in production, gunicorn --threads 8 app:app.
    app.run(args.host, args.port, threaded=True)


if __name__ == "__main__":
    main()
