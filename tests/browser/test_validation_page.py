"""The page the validation mail's link opens, in a real headless Chromium with a
phone-sized window: the link is read from the mail the real SMTP server received, and
the browser follows it as a person's would.  The page carries a Content-Security-Policy
that lets no script run, and the browser enforces it: what it shows needs none."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import shutil
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import KithFactory, RunningKith, SmtpSink, serving

V2 = "/_matrix/identity/v2"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PHONE = "390,844"  # CSS pixels of a common phone
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "validation-page.png"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium not installed (Debian: apt-get install chromium); CI has it")


async def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    """Open `url` in headless Chromium; the DOM it ends on.  (Chromium serialises the
    DOM with JavaScript, so it stays on here: the screenshot is taken without it.)"""
    assert CHROMIUM is not None, "chromium is missing: apt-get install chromium"
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={PHONE}", "--hide-scrollbars", "--dump-dom", *extra, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


async def screenshot(tmp_path: Path, url: str, path: Path) -> None:
    """A picture of `url` as a phone shows it."""
    await chromium(tmp_path, url, f"--screenshot={path}")


def mailed_link(smtp: SmtpSink, kith: RunningKith) -> str:
    """The submitToken link of the last mail, pointed at this kith."""
    message = email.message_from_string(smtp.messages[-1][1], policy=email.policy.default)
    body = message.get_body(("plain",))
    assert body is not None
    text = body.get_content()
    match = re.search(r"^(?:https?://[^/\s]+)?(/_matrix/identity/v2/validate/email/"
                      r"submitToken\?\S+)", text, re.MULTILINE)
    assert match, text
    return kith.base + match.group(1)


def text_of(dom: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<(style|head)>.*?</\1>", "", dom))
                    .split())


async def request_token(kith: RunningKith, token: str, address: str,
                        next_link: str | None = None) -> str:
    body = {"client_secret": "browser-secret", "email": address, "send_attempt": 1}
    if next_link is not None:
        body["next_link"] = next_link
    async with kith.http.post(f"{kith.base}{V2}/validate/email/requestToken", json=body,
                              headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["sid"])


async def test_the_mailed_link_in_a_browser(kith_factory: KithFactory, smtp: SmtpSink,
                                            tmp_path: Path) -> None:
    kith: RunningKith = await kith_factory(
        {"email": {"email.smtphost": "127.0.0.1", "email.smtpport": smtp.port}})
    token = await kith.register("alice")

    # No next_link: kith's own page says it worked and what to do next.
    await request_token(kith, token, "alice@example.org")
    link = mailed_link(smtp, kith)
    shot = tmp_path / "validation-page.png"
    dom = await chromium(tmp_path, link)
    assert text_of(dom) == ("Verification successful! Your email address is confirmed. "
                            "Please return to your Matrix client to continue; you can "
                            "close this page.")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in dom
    assert "<script" not in dom and "<noscript" not in dom
    async with kith.http.get(link.replace("token=", "token=x")) as resp:
        assert "script-src 'none'" in resp.headers["Content-Security-Policy"]
    await screenshot(tmp_path, link, shot)
    assert shot.stat().st_size > 1000
    if os.environ.get("KITH_UPDATE_SCREENSHOTS"):
        shutil.copyfile(shot, SCREENSHOT)

    # Opened again, or with a token changed by hand: the page says what to do instead.
    again = await chromium(tmp_path, link.replace("token=", "token=x"))
    assert text_of(again).startswith("Verification failed: this link has expired, was "
                                     "used already or is incomplete. Ask your Matrix "
                                     "client to send a new verification email")

    # With a next_link the browser lands on the client's page, with the sid.
    landed: list[str] = []

    async def client_page(request: web.Request) -> web.Response:
        landed.append(request.query.get("sid", ""))
        return web.Response(text="<html><body><p>Back in your Matrix client</p></body>"
                                 "</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/validated", client_page)
    async with serving(app) as client_url:
        sid = await request_token(kith, token, "alice.work@example.org",
                                  next_link=f"{client_url}/validated?from=mail")
        dom = await chromium(tmp_path, mailed_link(smtp, kith))
        assert text_of(dom) == "Back in your Matrix client"
        assert landed == [sid]

        # A next_link that is not http(s) is never followed: the page is shown instead.
        await request_token(kith, token, "alice.home@example.org",
                            next_link="javascript:alert(document.cookie)")
        dom = await chromium(tmp_path, mailed_link(smtp, kith))
        assert text_of(dom).startswith("Verification successful!")
        assert landed == [sid]
