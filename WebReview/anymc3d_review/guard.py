"""Who may use a review server, and what a page may change on it.

trame and wslink, as they come, let any web page talk to the server: the websocket takes any ``Origin``, the
wslink "hello" secret is the public default ``wslink-secret``, any client may set any state key (pushed to every
other tab before the server sees it), and wslink's ``application.exit`` stops the server. This module closes that:

- **Access key.** A key made per launch (:func:`make_key`) is carried by the printed address
  (``?secret=KEY``). The key is never put in a cookie: cookies ignore ports, so every other web server on the
  host (another user's Jupyter, a forwarded port) would receive it. A request that carries the key gets an
  ``HttpOnly; SameSite=Strict`` cookie whose value is an HMAC of the key ("the page's files", not the key): it
  opens the app's own static files (trame's generic page and scripts) and nothing else. Every HTTP request and the
  websocket upgrade need the key or that cookie, and a request whose ``Origin`` is not the server's own is refused
  (403). wslink's "hello" succeeds only with the key itself, on a websocket whose upgrade passed this check: a
  server on another port that received the cookie cannot read a case. The page keeps the key in its tab's
  ``sessionStorage`` (per origin: scheme, host and port) so that a reload still works (:data:`KEEP_KEY_SCRIPT`).
- **Every RPC checked.** Only the RPCs of :meth:`AccessGuard._rpc_checks` are served, each with its arguments
  validated and bounded (finite numbers, render sizes capped, interaction events rebuilt from checked fields, a
  registered trigger name); ``trame.rca.push`` (a forged frame for every tab), ``trame.rca.drop`` (freezes a view),
  ``trame.error.client`` (client text for the log), ``application.exit`` and any other name are refused. Each
  client's wslink message chunks are capped (:class:`_CappedUnChunker`).
- **Nothing raw in a log.** :class:`LogScrubber` escapes control characters in every log line and removes the key.
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
- wslink 2.6.0 ``wslink/protocol.py``: ``WslinkHandler.unchunkers`` (client id -> ``UnChunker``), whose limit
  ``handleSystemMessage`` raises to 4 GB per message after the hello (and a header may declare any size).
- trame-rca 2.11.8 ``trame_rca/protocol.py`` (``StreamManager``: ``trame.rca.*``, ``_area_adapters``) and
  ``rca/vtk_rca.py``, which hands the event to VTK's ``vtkRemoteInteractionAdapter::ProcessEvent`` (VTK
  Web/Core/vtkRemoteInteractionAdapter.cxx: nlohmann ``at``/``get`` of the fields below; a NaN, a string or a
  missing field is an uncaught C++ exception that aborts the process).
- aiohttp 3.14 ``web.FileResponse`` and trame-client 4.1.4's ``index.html`` (from ``trame_client.module.vue3.www``).
If any of these hooks is missing the server refuses to start (:meth:`AccessGuard.bind`): it never runs open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from urllib.parse import urlsplit

from pathlib import Path

from aiohttp import web
from wslink.chunking import UnChunker
from wslink.websocket import LinkProtocol

from .page_input import (  # noqa: F401 (the checks of what a page sends; re-exported)
    MAX_ABS_NUMBER,
    MAX_RENDER_SIDE,
    boolean,
    finite_float,
    index_below,
    interaction_event,
    one_of,
    printable,
    render_size,
    rpc_wrappers,
)

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


#: the most a page may send as one wslink message, and in all its unfinished messages together (its largest
#: real messages, state updates and events, are a few kB)
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_PENDING_BYTES = 4 * 1024 * 1024
LAUNCHER_ROUTE = "/paraview/"  # trame-client's default launcher address (vue3-www: `${document.baseURI}paraview/`)
#: the index page's first script: the key from the address goes to this tab's sessionStorage (per origin, unlike
#: a cookie), and a reload without it in the address gets it back before trame's client reads it
KEEP_KEY_SCRIPT = (
    "<script>(function(){try{var p=new URLSearchParams(location.search),n='anymc3d_review_key',k=p.get('secret');"
    "if(k){sessionStorage.setItem(n,k);}else{k=sessionStorage.getItem(n);if(k){p.set('secret',k);"
    "history.replaceState(history.state,'',location.pathname+'?'+p.toString()+location.hash);}}}catch(e){}})();"
    "</script>")


class LogScrubber(logging.Filter):
    """A handler filter: every log line with control characters escaped and the access key replaced (aiohttp's
    access log at DEBUG prints request lines, which carry ``?secret=``)."""

    def __init__(self, *secrets_):
        super().__init__()
        self.secrets = [s for s in secrets_ if s]

    def filter(self, record):
        message = record.getMessage()
        for secret in self.secrets:
            message = message.replace(secret, "<key>")
        cleaned = printable(message, 20000)
        if cleaned != record.msg or record.args:
            record.msg, record.args = cleaned, None
        return True

    def install(self) -> None:
        """On every handler of the root logger and of the loggers that exist now."""
        loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
        for handler in {id(h): h for lg in loggers for h in getattr(lg, "handlers", [])}.values():
            if self not in handler.filters:
                handler.addFilter(self)


def make_key() -> str:
    """A fresh access key (192 random bits). It starts with a letter: trame's client turns an all-digit URL
    parameter into a number."""
    return "k" + secrets.token_urlsafe(24)


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
        return client_id in self.authorised and self.key_ok(token)

    key_ok = staticmethod(lambda token: False)  # set by the AccessGuard: the key itself, never the cookie


class _CappedUnChunker(UnChunker):
    """wslink's UnChunker with bounded memory: one message at most MAX_MESSAGE_BYTES (wslink allows 4 GB after the
    hello, each chunk header declaring its own size), all of a client's unfinished messages MAX_PENDING_BYTES."""

    def set_max_message_size(self, size):
        super().set_max_message_size(min(size, MAX_MESSAGE_BYTES))

    def process_chunk(self, chunk):
        header_size = int.from_bytes(chunk[8:12], "little") if len(chunk) >= 12 else 0
        pending = sum(len(message["content"]) for message in self.pending_messages.values())
        new = 0 if int.from_bytes(chunk[:4], "little") in self.pending_messages else header_size
        if pending + new > MAX_PENDING_BYTES:
            self.release_pending_messages()
            raise ValueError("unfinished wslink messages over the limit: connection closed")
        return super().process_chunk(chunk)


class _CappedUnChunkers(dict):
    def __setitem__(self, client_id, unchunker):
        if type(unchunker) is UnChunker:
            unchunker = _CappedUnChunker()
        super().__setitem__(client_id, unchunker)


async def _launcher_answer(request):
    """trame's page asks a launcher for its websocket address first (POST ``/paraview/``) and takes the server's
    own ``/ws`` when that fails (a 405 in the console of every page open). This server is its own launcher: the
    same address, ``use_host`` being the host the page came from (trame-client fills it in). The request's body
    (the page's configuration, with its key) is never read."""
    return web.json_response({"sessionURL": "ws://use_host/ws"})


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
        # the cookie's value: derived from the key, never the key (it opens the page's static files only)
        self.cookie_value = hmac.new(self.key.encode(), b"anymc3d-review: the page's files", hashlib.sha256).hexdigest()
        self.refused: list[str] = []  # what was refused (newest last, bounded): for the log and the tests
        self._gate = _HelloGate()
        self._gate.key_ok = self.key_ok
        self.scrubber = LogScrubber(self.key, self.cookie_value)

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
        cookie = request.cookies.get(self.cookie_name)
        by_cookie = isinstance(cookie, str) and hmac.compare_digest(cookie.encode(), self.cookie_value.encode())
        if not (by_key or by_cookie):
            self._note(f"request without the access key to {request.path}")
            return web.Response(status=403, text=REFUSED_TEXT)
        request[AUTHORISED] = True
        try:
            response = await handler(request)
            if isinstance(response, web.FileResponse) and request.path in ("/", "/index.html"):
                response = self._index_page()
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
            response.set_cookie(self.cookie_name, self.cookie_value, httponly=True, samesite="Strict", path="/")

    @staticmethod
    def _index_page():
        """trame-client's index.html with :data:`KEEP_KEY_SCRIPT` first in its head (no caching: it is tiny)."""
        from trame_client.module.vue3 import www

        page = (Path(www) / "index.html").read_text(encoding="utf-8")
        return web.Response(text=page.replace("<head>", "<head>" + KEEP_KEY_SCRIPT, 1), content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    # wslink: hello, state updates, exit -----------------------------------------------------------------

    def install(self, server) -> None:
        """Hook into a trame server before ``start()``: the hello gate, the middleware and the RPC filters."""
        server.add_protocol_to_configure(lambda protocol: protocol.registerLinkProtocol(self._gate))
        server.controller.on_server_bind.add(self.bind)

    def bind(self, ws_server) -> None:
        """``on_server_bind``: the aiohttp app is built but not frozen; the RPC table exists."""
        handlers = getattr(ws_server, "_ws_handlers", None)
        app = getattr(ws_server, "app", None)
        if (not handlers or app is None or any("trame.state.update" not in h.functionMap for h in handlers)
                or any(not isinstance(getattr(h, "unchunkers", None), dict) for h in handlers)):
            raise RuntimeError("the review server cannot secure this wslink/trame version (see anymc3d_review.guard)")
        app.middlewares.append(self.middleware)
        app.router.add_post(LAUNCHER_ROUTE, _launcher_answer)
        checks = self._rpc_checks()
        for handler in handlers:
            handler.unchunkers = _CappedUnChunkers(handler.unchunkers)
            functions = handler.functionMap
            for uri, (protocol, function) in list(functions.items()):
                check = checks.get(uri)
                functions[uri] = (protocol, check(function) if check else self._refused(uri))

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

    def _refused(self, uri):
        def refuse(*_, **__):
            if uri == "trame.error.client":  # a page's script error (every page open has some): text never logged
                logger.debug("a page reported a script error (its text is not logged)")
                return
            self._note(f"{uri} from a client")
        return refuse

    def _rpc_checks(self):
        """RPC name -> wrapper of its function that checks the arguments (every other RPC is refused)."""
        return {"trame.state.update": self._filtered_update, "trame.lifecycle.update": self._filtered_life_cycle,
                **rpc_wrappers(self._note)}

    def _note(self, what):
        what = printable(what)
        logger.warning("refused: %s", what)
        self.refused = (self.refused + [what])[-50:]


__all__ = [
    "AUTHORISED",
    "LogScrubber",
    "printable",
    "KEY_PARAMETER",
    "AccessGuard",
    "boolean",
    "finite_float",
    "index_below",
    "make_key",
    "one_of",
]
