"""Serve any reward spec over HTTP for :class:`fnf.reward_client.HttpReward` (the protocol is there and in
docs/grpo.md), from a process of its own, e.g. one whose dependencies conflict with the trainer's:

    python -m fnf.reward_server --reward brightness --port 8000
    python -m fnf.reward_server --reward my_rewards.py:ocr_score --kwargs '{"lang": "en"}' --port 8000

It prints one line with its URL (``fnf reward server: <spec> on http://127.0.0.1:PORT/score``) and serves until
interrupted. Only the standard library's http.server: one request at a time, loopback by default. A reward that
raises answers HTTP 500 with ``{"error": ...}`` (the client retries 5xx, then reports it); a malformed request
answers 400.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import torch

from .reward_client import PROTOCOL_VERSION, SHORTHAND_PATH, decode_png
from .rewards import build_reward, score

__all__ = ["RewardHandler", "decode_request", "main", "serve", "start"]


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """The (B, 3, H, W) float32 images in [0, 1] and the prompts of one request body (ValueError if malformed)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError("body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("prompts"), list):
        raise ValueError('expected {"version": 1, "images": [base64 PNG, ...], "prompts": [str, ...]}')
    if data.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ValueError(f"protocol version {data.get('version')!r} (this server speaks {PROTOCOL_VERSION})")
    images, prompts = data["images"], data["prompts"]
    if len(images) != len(prompts) or not images:
        raise ValueError(f"{len(images)} images and {len(prompts)} prompts (need the same number, > 0)")
    arrays = [decode_png(base64.b64decode(s, validate=True)) for s in images]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("images of different sizes in one request")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return x, [str(p) for p in prompts]


class RewardHandler(BaseHTTPRequestHandler):
    """POST any path: scores of the request's images by ``server.reward``."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - http.server's name
        self.respond(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def respond(self, body: bytes) -> None:
        """Answer one request body: 200 with the scores, 400 for a malformed request, 500 if the reward fails."""
        try:
            images, prompts = decode_request(body)
        except Exception as e:  # noqa: BLE001 - any malformed request is the client's error
            return self.answer(400, {"error": f"bad request: {e}"})
        try:
            with torch.no_grad():
                scores = score(self.server.reward, images, prompts, finite=True)
        except Exception as e:  # noqa: BLE001 - the reward's failure, reported to the client
            return self.answer(500, {"error": f"reward failed: {type(e).__name__}: {e}"})
        self.answer(200, {"scores": scores.tolist()})

    def answer(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):   # quiet: one line per request would flood a training log
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)


def serve(reward, host: str = "127.0.0.1", port: int = 0, handler=RewardHandler) -> HTTPServer:
    """An HTTPServer (not yet serving) answering with ``reward``, bound to ``host:port`` (0: a free port)."""
    server = HTTPServer((host, port), handler)
    server.reward = reward
    return server


def start(reward, host: str = "127.0.0.1", port: int = 0, handler=RewardHandler) -> tuple[HTTPServer, str]:
    """``serve`` in a daemon thread; returns (server, its URL). ``server.shutdown()`` stops it."""
    server = serve(reward, host, port, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}{SHORTHAND_PATH}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fnf.reward_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", required=True, metavar="SPEC", help="reward spec (a built-in, module:callable, file.py:callable)")
    p.add_argument("--kwargs", default="{}", metavar="JSON", help="the reward's kwargs as a JSON object")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = a free one)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not a JSON object")
        reward = build_reward(args.reward, **kwargs)
    except ValueError as e:
        print(f"fnf reward server: {e}", file=sys.stderr)
        return 2
    if isinstance(reward, torch.nn.Module):
        reward.eval().requires_grad_(False)
    server = serve(reward, args.host, args.port)
    server.verbose = args.verbose
    print(f"fnf reward server: {args.reward} on http://{args.host}:{server.server_address[1]}{SHORTHAND_PATH}",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
