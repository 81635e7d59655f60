"""GET /runbooks: the runbooks shipped in the package (zmon/runbooks.md, the README's section), as HTML.

Every zmon serves them, so the `runbook_url` of an alert resolves wherever zmon runs, without a hosted copy:
`<zmon URL>/runbooks#runbook-<alertname in lower case>`. The markdown is the small subset the section uses
(headings, paragraphs, bullet lists, `code`, **bold**, [links](…)).
"""

from __future__ import annotations

import html
import re
from functools import cache
from importlib import resources

from zmon.alerting.alertmanager import RUNBOOKS_PATH as PATH
from zmon.server.core import Request, Response

__all__ = ["PATH", "page", "render_html", "runbooks_handler"]

ANCHOR_PREFIX = "runbook-"
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zmon runbooks</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}}
code{{background:#f3f3f3;padding:0 .2em}}h3{{margin-top:2em;border-top:1px solid #ddd;padding-top:1em}}</style>
</head><body>
{body}
</body></html>
"""


def _slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens ("Runbook: ZmonOOM" →
    "runbook-zmonoom"), so the README's links and this page's agree."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"\[([^\]]+)\]\(#([^)]+)\)", r'<a href="#\2">\1</a>', out)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)


def render_html(markdown: str) -> str:
    body: list[str] = []
    in_list = False
    for line in markdown.splitlines():
        if line.startswith("<!--"):
            continue
        if in_list and not line.startswith("- "):
            body.append("</ul>")
            in_list = False
        if m := re.match(r"^(#{2,6})\s+(.*)$", line):
            level, title = len(m[1]), m[2]
            body.append(f'<h{level} id="{_slug(title)}">{_inline(title)}</h{level}>')
        elif line.startswith("- "):
            if not in_list:
                body.append("<ul>")
                in_list = True
            body.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_list:
        body.append("</ul>")
    return _PAGE.format(body="\n".join(body))


@cache
def page() -> bytes:
    """The rendered page (the packaged markdown is read once)."""
    markdown = resources.files("zmon").joinpath("runbooks.md").read_text(encoding="utf-8")
    return render_html(markdown).encode()


def runbooks_handler(_: Request) -> Response:
    return Response(200, page(), headers={"Content-Type": "text/html; charset=utf-8"})
