"""Who may use a review server, and what a page may change on it.

trame and wslink, as they come, let any web page talk to the server: the websocket takes any ``Origin``, the
wslink "hello" secret is the public default ``wslink-secret``, any client may set any state key (pushed to every
other tab before the server sees it), and wslink's ``application.exit`` stops the server. This module closes that:

- **Access key.** A key made per launch (:func:`make_key`) is carried by the printed address
  (``?secret=KEY``). A request that carries it gets an ``HttpOnly; SameSite=Strict`` cookie; every HTTP request and
  the websocket upgrade need the key or that cookie, and a request whose ``Origin`` is not the server's own
  is refused (403). A websocket client is let through wslink's "hello" only when its upgrade passed this check.
- **State a page may write.** Only the keys of :attr:`AccessGuard.writable`, each through its validator; anything
  else (``trame__template_*``, script and style lists, the chart, the case list, ...) is refused and the server's
  value is sent back. Refused values are never pushed to other tabs.
- **No remote stop.** ``application.exit`` and ``application.exit.later`` do nothing; only the life-cycle names
  trame's own client sends reach ``trame.lifecycle.update``.

What this relies on (read in the installed wheels, which match the named commits):
- wslink 2.6.0 ``wslink/protocol.py`` (identical at github Kitware/wslink f13e01f): ``WslinkHandler.__init__``
  builds ``functionMap`` (uri -> (protocol, function)) once, server protocol last; ``handleSystemMessage``
  authenticates "wslink.hello" through every link protocol's ``validateToken`` when one has it; ``onConnect``
  passes the upgrade's aiohttp request to every link protocol.
- wslink 2.6.0 ``wslink/websocket.py`` (same commit): ``ServerProtocol.exit`` / ``exitLater`` are the RPCs
  ``application.exit`` / ``application.exit.later`` and call ``stopServer``.
- wslink 2.6.0 ``wslink/backends/aiohttp/__init__.py``: ``WebAppServer`` builds its aiohttp ``Application`` and
  ``AioHttpWsHandler`` objects (``_ws_handlers``) in ``__init__`` and freezes the app only in ``start()``.
- trame-server 4.1.0 ``trame_server/protocol.py`` (same logic at github Kitware/trame-server 3d064a3):
  ``CoreServer.set_server`` calls ``controller.on_server_bind(ws_server)`` after the handlers exist and before
  ``start()``; ``update_state`` pushes a client's changes to the other clients, then updates the server state;
  ``CoreServer.initialize`` runs the ``add_protocol_to_configure`` callbacks.
- trame-client 4.1.4 (vue3 bundle ``index-*.js``): the page reads ``secret`` from its address for the wslink hello
  and then removes it from the address bar; it sends the life cycles ``client_connected``, ``client_exited`` and
  ``client_unmounted``.
If any of these hooks is missing the server refuses to start (:meth:`AccessGuard.bind`): it never runs open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
from urllib.parse import urlsplit

from aiohttp import web
from wslink.websocket import LinkProtocol

logger = logging.getLogger("anymc3d.review")

KEY_PARAMETER = "secret"  # the URL parameter trame's client reads its wslink secret from
AUTHORISED = "anymc3d_review_authorised"  # set on an aiohttp request that passed the key/cookie and Origin checks
CLIENT_LIFE_CYCLES = ("client_connected", "client_exited", "client_unmounted")
REFUSED_TEXT = ("Forbidden: open the address printed by 'anymc3d review' (it carries this server's access key).\n")
SECURITY_HEADERS = {
    "Referrer-Policy": "no-referrer",          # the key in the address never leaves in a Referer
    "X-Frame-Options": "DENY",                 # no framing by another site (clickjacking)
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def make_key() -> str:
    """A fresh access key (192 random bits). It starts with a letter: trame's client turns an all-digit URL
    parameter into a number."""
    return "k" + secrets.token_urlsafe(24)


# Validators of the state a page may write: each returns the value to apply or raises ValueError ----------------

def finite_float(low=None, high=None):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"not a finite number: {value!r}")
        value = float(value)
        if low is not None:
            value = max(low, value)
        if high is not None:
            value = min(high, value)
        return value
    return check


def index_below(count):
    """An int in [0, count()) (``count`` is called at check time: the listing may change)."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count():
            raise ValueError(f"not an index below {count()}: {value!r}")
        return value
    return check


def one_of(choices):
    def check(value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"not one of {tuple(choices)}: {value!r}")
        return value
    return check


def boolean(value):
    if not isinstance(value, bool):
        raise ValueError(f"not a boolean: {value!r}")
    return value


class _HelloGate(LinkProtocol):
    """wslink "hello" succeeds only for a websocket whose upgrade request passed the guard's middleware."""

    def __init__(self):
        super().__init__()
        self.authorised = set()

    def onConnect(self, request, client_id):
        if hasattr(request, "get") and request.get(AUTHORISED) is True:
            self.authorised.add(client_id)

    def onClose(self, client_id):
        self.authorised.discard(client_id)

    async def validateToken(self, token, client_id):
        return client_id in self.authorised


class AccessGuard:
    """Args:
        key: the access key (default: a new one).
        writable: state key -> validator, the only state a page may change.
    Use :meth:`install` on a trame server before it starts.
    """

    def __init__(self, key: str | None = None, writable: dict | None = None):
        self.key = key or make_key()
        self.writable = dict(writable or {})
        self.cookie_name = "anymc3d_review_" + hashlib.sha256(self.key.encode()).hexdigest()[:12]
        self.refused: list[str] = []  # what was refused (newest last, bounded): for the log and the tests
        self._gate = _HelloGate()

    # Addresses -------------------------------------------------------------------------------------------

    def url(self, host: str, port: int) -> str:
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"http://{host}:{port}/?{KEY_PARAMETER}={self.key}"

    # HTTP: key or cookie, and the server's own Origin ----------------------------------------------------

    def key_ok(self, value) -> bool:
        return isinstance(value, str) and hmac.compare_digest(value.encode(), self.key.encode())

    @staticmethod
    def origin_ok(request) -> bool:
        """No Origin (a non-browser client, or a same-origin GET) or exactly this server's scheme://host:port."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == request.host.lower()

    @web.middleware
    async def middleware(self, request, handler):
        if not self.origin_ok(request):
            self._note(f"request from origin {request.headers.get('Origin')!r} to {request.path}")
            return web.Response(status=403, text=REFUSED_TEXT)
        by_key = self.key_ok(request.query.get(KEY_PARAMETER))
        if not (by_key or self.key_ok(request.cookies.get(self.cookie_name))):
            self._note(f"request without the access key to {request.path}")
            return web.Response(status=403, text=REFUSED_TEXT)
        request[AUTHORISED] = True
        try:
            response = await handler(request)
        except web.HTTPException as redirect:  # "/" -> "index.html?secret=...": keep the cookie on it too
            self._decorate(redirect, by_key)
            raise
        self._decorate(response, by_key)
        return response

    def _decorate(self, response, set_cookie):
        if getattr(response, "prepared", False):  # a websocket: its headers are long gone
            return
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if set_cookie:
            response.set_cookie(self.cookie_name, self.key, httponly=True, samesite="Strict", path="/")

    # wslink: hello, state updates, exit -----------------------------------------------------------------

    def install(self, server) -> None:
        """Hook into a trame server before ``start()``: the hello gate, the middleware and the RPC filters."""
        server.add_protocol_to_configure(lambda protocol: protocol.registerLinkProtocol(self._gate))
        server.controller.on_server_bind.add(self.bind)

    def bind(self, ws_server) -> None:
        """``on_server_bind``: the aiohttp app is built but not frozen; the RPC table exists."""
        handlers = getattr(ws_server, "_ws_handlers", None)
        app = getattr(ws_server, "app", None)
        if not handlers or app is None or any("trame.state.update" not in h.functionMap for h in handlers):
            raise RuntimeError("the review server cannot secure this wslink/trame version (see anymc3d_review.guard)")
        app.middlewares.append(self.middleware)
        for handler in handlers:
            functions = handler.functionMap
            protocol, update_state = functions["trame.state.update"]
            functions["trame.state.update"] = (protocol, self._filtered_update(update_state))
            if "trame.lifecycle.update" in functions:
                functions["trame.lifecycle.update"] = (protocol, self._filtered_life_cycle(functions["trame.lifecycle.update"][1]))
            for uri in ("application.exit", "application.exit.later"):
                functions[uri] = (protocol, self._refused_exit)

    def _filtered_update(self, update_state):
        def update(protocol, changes, *_, **__):
            accepted, refused = [], []
            for change in changes if isinstance(changes, list) else []:
                key = change.get("key") if isinstance(change, dict) else None
                check = self.writable.get(key) if isinstance(key, str) else None
                try:
                    if check is None:
                        raise ValueError("not writable by a page")
                    accepted.append({"key": key, "value": check(change.get("value"))})
                except (TypeError, ValueError) as error:
                    refused.append(key)
                    self._note(f"state change of {str(key)[:80]!r}: {error}"[:200])
            if accepted:
                update_state(protocol, accepted)
            state = protocol.server.state
            known = [key for key in refused if isinstance(key, str) and key in state]
            if known:  # the sender's copy goes back to the server's value
                protocol.force_push_state(*known)
        return update

    def _filtered_life_cycle(self, life_cycle):
        def update(protocol, name, *_, **__):
            if name in CLIENT_LIFE_CYCLES:
                return life_cycle(protocol, name)
            self._note(f"life cycle {str(name)[:80]!r}")
            return None
        return update

    def _refused_exit(self, *_, **__):
        self._note("application.exit from a client")

    def _note(self, what):
        logger.warning("refused: %s", what)
        self.refused = (self.refused + [what])[-50:]


__all__ = [
    "AUTHORISED",
    "KEY_PARAMETER",
    "AccessGuard",
    "boolean",
    "finite_float",
    "index_below",
    "make_key",
    "one_of",
]
