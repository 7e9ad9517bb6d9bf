"""Attacks on a running review server, the way issue 14 found them: a foreign page or a script on the websocket,
client-set HTML, a remote stop. Each fails on a server without anymc3d_review.guard (checked: they all succeeded
against the server as it was)."""

import asyncio
import json
import urllib.parse

import pytest
from anymc3d_review.testing import (
    WslinkClient,
    http_status,
    open_page,
    run_async,
    state,
    wait_frames,
    wait_state,
)

XSS = "<img src=x onerror=\"window.__pwned = (window.__pwned || 0) + 1\">"


def run(coroutine):
    return run_async(coroutine)


def key_cookie(server, page_or_none=None):
    """The cookie a browser gets from the printed address (name and value), read from a real response."""
    import urllib.request

    with urllib.request.urlopen(server.url, timeout=10) as response:
        cookies = response.headers.get_all("Set-Cookie") or []
    assert cookies, "the printed address sets no cookie"
    return cookies[0].split(";", 1)[0]


def test_printed_address_works_and_nothing_is_served_without_its_key(server):
    query = urllib.parse.urlparse(server.url).query
    key = urllib.parse.parse_qs(query)["secret"][0]
    assert len(key) >= 30 and key != "wslink-secret"
    assert http_status(server.url) == 200
    for path in ("", "index.html", "ws"):
        assert http_status(server.base + path) == 403, path
    assert http_status(server.base + "?secret=wslink-secret") == 403
    assert http_status(server.base, headers={"Cookie": key_cookie(server)}) == 200


def test_foreign_origin_or_keyless_websocket_gets_no_data(server):
    cookie = key_cookie(server)

    async def attack():
        # a page on another site, even in a browser that holds the cookie: refused at the upgrade
        assert await WslinkClient.connect(server.base, origin="http://evil.example", cookie=cookie) is None
        assert await WslinkClient.connect(server.base, origin="null", cookie=cookie) is None
        # no key, no cookie: refused, whatever the Origin (and trame's public default secret is no key)
        assert await WslinkClient.connect(server.base, origin=server.base.rstrip("/")) is None
        assert await WslinkClient.connect(server.base, query="?secret=wslink-secret") is None
        # the server's own page (its Origin, the cookie, the key in its hello) gets through: the refusals above
        # are not a dead server; the cookie alone opens the upgrade, never the hello (it is not the key)
        client = await WslinkClient.connect(server.base, origin=server.base.rstrip("/"), cookie=cookie)
        assert client is not None
        assert "error" in await client.hello("wslink-secret")
        assert "error" in await client.hello(cookie.split("=", 1)[1])
        reply = await client.hello(server.key)
        assert "result" in reply, reply
        got = await client.call("trame.state.get")
        await client.close()
        return got

    got = run(attack())
    names = [case["name"] for case in got["result"]["state"]["cases"]]
    assert "volume.nii.gz" in names


def test_client_set_html_and_templates_never_reach_a_page(server, browser):
    original_threshold = None

    async def attack():
        nonlocal original_threshold
        client = await WslinkClient.connect(server.url)  # authenticated: the attacker has the address
        assert "result" in await client.hello(server.key)
        before = (await client.call("trame.state.get"))["result"]["state"]
        original_threshold = before["threshold"]
        changes = [{"key": "chart_svg", "value": XSS}, {"key": "chart", "value": {"lines": XSS}},
                   {"key": "trame__template_main", "value": f"<div>{XSS}</div>"},
                   {"key": "trame__scripts", "value": ["http://evil.example/x.js"]},
                   {"key": "cases", "value": [{"index": 0, "name": XSS}]},
                   {"key": "case_error", "value": XSS}, {"key": "case_index", "value": "../../etc/passwd"},
                   {"key": "threshold", "value": 0.35}]  # the one change a page may make
        await client.call("trame.state.update", [changes])
        after = (await client.call("trame.state.get"))["result"]["state"]
        await client.close()
        return before, after

    before, after = run(attack())
    assert "chart_svg" not in after
    for key in ("chart", "cases", "case_error", "case_index"):
        assert after.get(key) == before.get(key), key
    assert XSS not in json.dumps(after)
    assert after["threshold"] == pytest.approx(0.35)  # a valid change of a writable key goes through

    page = open_page(browser, server.url)
    try:
        wait_frames(page, 0, timeout=60)
        page.wait_for_timeout(500)
        assert page.evaluate("() => window.__pwned") is None
        assert page.locator("img[src='x']").count() == 0
        assert XSS not in page.content()
        # a page that tries it on itself: its change is refused and never reaches another tab
        page.evaluate("(v) => window.trame.state.set('case_error', v)", XSS)
        page.evaluate("(v) => window.trame.state.set('trame__template_main', v)", f"<div>{XSS}</div>")
        second = open_page(browser, server.url)
        try:
            wait_frames(second, 0, timeout=60)
            second.wait_for_timeout(500)
            assert second.evaluate("() => window.__pwned") is None
            assert state(second, "case_error") in ("", None)
        finally:
            second.close()
        page.evaluate("(v) => window.trame.state.set('threshold', v)", original_threshold)
        wait_state(page, f"s('threshold') === {original_threshold}")
    finally:
        page.close()


def test_application_exit_from_a_client_leaves_the_server_answering(server):
    async def attack():
        client = await WslinkClient.connect(server.url)
        assert "result" in await client.hello(server.key)
        await client.call("application.exit", timeout=3)
        await client.call("application.exit.later", [0], timeout=3)
        await client.call("trame.lifecycle.update", ["server_exited"], timeout=3)
        await client.close()
        await asyncio.sleep(1.5)
        again = await WslinkClient.connect(server.url)
        assert again is not None
        hello = await again.hello(server.key)
        await again.close()
        return hello

    assert "result" in run(attack())
    assert server.process.poll() is None
    assert http_status(server.url) == 200
    assert "refused: application.exit" in server.output()
