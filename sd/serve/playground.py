"""The playground page: the files in sd/serve/static/ (HTML, CSS and plain JS modules, shipped in
the package; no framework, no build step, nothing fetched from elsewhere), served at `/` and
`/static/NAME`. They are public: the page itself asks for the API token when the API answers 401.

Each file goes out with its content type, an ETag and `Cache-Control: no-cache` (the browser
revalidates, and gets a 304 while the file is unchanged, so an upgraded package is seen at once);
the page with a Content-Security-Policy that allows this server's own scripts, styles and API only.
"""

import hashlib
from pathlib import Path

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
          "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def files() -> dict[str, Path]:
    """The files the page may load, by name: only these are served (no path from a request is opened)."""
    return {path.name: path for path in STATIC.iterdir() if path.suffix in TYPES and path.is_file()}


def serve(request, name: str):
    from starlette.responses import Response
    path = files().get(name)
    if path is None:
        return Response(f"no file {name!r} in the playground\n", 404, media_type="text/plain")
    body = path.read_bytes()
    tag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {"ETag": tag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if path.suffix == ".html":
        headers.update({"Content-Security-Policy": POLICY, "Referrer-Policy": "no-referrer"})
    if tag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, headers=headers, media_type=TYPES[path.suffix])


async def page(request):
    return serve(request, "index.html")


async def asset(request):
    return serve(request, request.path_params["name"])
