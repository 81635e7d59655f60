"""A minimal image service monitored in-process by zmon: POST /generate {prompt, width, height, steps} → PNG.

Runs as is on CPU with the embedded tiny model (no download):

    python examples/host_service.py --listen 127.0.0.1:8080 --zmon-listen 127.0.0.1:8739
    curl -s -X POST localhost:8080/generate -d '{"prompt": "a red apple", "width": 64}' > out.png
    curl -s localhost:8739/metrics | grep zmon_generations_total

The only zmon-specific lines are the `zmon.attach(...)` call and `handle.detach()` at shutdown. The pipeline
is called under a lock: one diffusers pipeline object runs one generation at a time, whatever the HTTP
threads.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import zmon
from zmon.config import load_config, parse_listen
from zmon.workload.loading import load_pipeline, model_defaults, vae_scale_factor

log = logging.getLogger("host_service")
MAX_BODY_BYTES = 64 * 1024
MAX_SIDE = 2048


class BadRequest(Exception):
    pass


def _int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def make_handler(pipe: Any, defaults: dict[str, Any], multiple: int) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()
    width0, height0 = defaults["resolution"]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/generate":
                self._reply(404, "application/json", b'{"error": "POST /generate"}\n')
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise BadRequest(f"body over {MAX_BODY_BYTES} bytes")
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("body must be a JSON object")
                prompt = body.get("prompt")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise BadRequest("prompt must be a non-empty string")
                width = _int_field(body, "width", width0, multiple, MAX_SIDE)
                height = _int_field(body, "height", height0, multiple, MAX_SIDE)
                if width % multiple or height % multiple:
                    raise BadRequest(f"width and height must be multiples of {multiple}")
                steps = _int_field(body, "steps", defaults["steps"], 1, 100)
                seed = _int_field(body, "seed", 0, 0, 2**63 - 1)
            except (BadRequest, ValueError) as e:
                self._reply(400, "application/json", json.dumps({"error": str(e)}).encode() + b"\n")
                return
            import torch

            with lock:  # one generation at a time on one pipeline object
                out = pipe(
                    prompt=prompt,
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    guidance_scale=defaults["guidance_scale"],
                    generator=torch.Generator("cpu").manual_seed(seed),
                )
            buf = io.BytesIO()
            out.images[0].save(buf, format="PNG")
            self._reply(200, "image/png", buf.getvalue())

        def _reply(self, status: int, ctype: str, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A minimal image service monitored in-process by zmon.")
    p.add_argument("--listen", default="127.0.0.1:8080", help="address of the image service")
    p.add_argument("--zmon-config", metavar="FILE", help="zmon YAML configuration (model.*, server.*, ...)")
    p.add_argument("--zmon-listen", metavar="HOST:PORT", help="where zmon serves /metrics")
    p.add_argument("--model", help="model id (default: the config's model.id, the embedded tiny Z-Image)")
    p.add_argument("--cache-dir", help="model.cache_dir (where the embedded model is built once)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    overrides: dict[str, Any] = {}
    if args.zmon_listen:
        overrides["server"] = {"listen": args.zmon_listen}
    model: dict[str, Any] = {}
    if args.model:
        model["id"] = args.model
    if args.cache_dir:
        model["cache_dir"] = args.cache_dir
    if model:
        overrides["model"] = model
    cfg = load_config(args.zmon_config, overrides=overrides)

    loaded = load_pipeline(cfg.model)
    defaults = dict(model_defaults(loaded.pipe, loaded.model_id))

    handle = zmon.attach(loaded.pipe, cfg, model_id=loaded.model_id)
    host, port = parse_listen(args.listen)
    handler = make_handler(loaded.pipe, defaults, vae_scale_factor(loaded.pipe))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "serving POST http://%s:%d/generate; zmon /metrics at %s/metrics",
        server.server_address[0],
        server.server_address[1],
        handle.url,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
        handle.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
