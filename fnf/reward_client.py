"""Rewards without a gradient: a reward served by another process over HTTP, and a black-box wrapper.

A reward whose dependencies conflict with the trainer's (another torch, another transformers, a VLM stack) runs in
a process of its own and serves scores over HTTP on the loopback interface; the reward spec names its URL:

    reward: {spec: "http://127.0.0.1:8000/score", kwargs: {timeout: 60, retries: 2}}
    reward: {spec: "http:8000"}                      # shorthand for http://127.0.0.1:8000/score

The protocol (version 1; docs/grpo.md): one POST per batch, ``Content-Type: application/json``, body
``{"version": 1, "images": [<base64 PNG>, ...], "prompts": [<str>, ...]}`` with 8-bit RGB PNGs of the [0, 1]
images; the answer is HTTP 200 with ``{"scores": [<number>, ...]}``, one finite number per image, in order. Any
other answer (an HTTP error, not JSON, a wrong count, a non-number, NaN or inf) raises :class:`RewardServerError`
naming the URL and what was wrong: never a silent zero. Connection failures, timeouts and HTTP 429 / 5xx are
retried (``retries`` times, ``backoff`` seconds doubling); a malformed answer is not (the server would give it
again). Only the standard library is used (urllib, zlib, json), so the client runs on any image the trainer runs
on. :mod:`fnf.reward_server` is a server for any reward spec (``python -m fnf.reward_server --reward SPEC``).

Only loopback hosts are accepted unless ``allow_remote: true``: the images and prompts travel as plain HTTP with no
authentication, so a remote endpoint would see the training data unencrypted, and whoever answers steers the
training. Environment proxies are never used (an ``http_proxy`` must not redirect loopback traffic).
"""
from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import math
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np
import torch

__all__ = ["BlackBoxReward", "GradientUseError", "HttpReward", "RewardServerError", "decode_png", "encode_png",
           "is_http_spec", "parse_url", "check_http_spec"]

PROTOCOL_VERSION = 1
SHORTHAND_PATH = "/score"
RETRY_STATUS = (429, 500, 502, 503, 504)


class RewardServerError(RuntimeError):
    """A reward server gave no usable scores (no answer after the retries, an HTTP error, or a malformed answer)."""


class GradientUseError(RuntimeError):
    """A black-box reward was asked for a gradient."""


# ------------------------------------------------------------------------------------------ PNG (stdlib + numpy)
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: torch.Tensor | np.ndarray, level: int = 6) -> bytes:
    """An 8-bit RGB PNG of one image: (3, H, W) float in [0, 1] (rounded to k/255), or (H, W, 3) uint8."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.dtype != np.uint8:
        if a.ndim != 3 or a.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W) float in [0, 1]; got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("image holds NaN or inf: it cannot be sent to a reward server")
        a = np.rint(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"uint8 image must be (H, W, 3); got shape {a.shape}")
    h, w = a.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, w * 3)], axis=1).tobytes()  # filter 0 rows
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, level)) + \
        _chunk(b"IEND", b"")


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def decode_png(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 from an 8-bit RGB or RGBA PNG, non-interlaced (alpha dropped); every row filter."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG has no IHDR chunk")
    w, h, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"only 8-bit RGB/RGBA non-interlaced PNGs are read (bit depth {depth}, colour type "
                         f"{colour}, interlace {interlace})")
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), np.int32)
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):
        f, row = raw[y, 0], raw[y, 1:].astype(np.int32)
        if f == 0:
            cur = row
        elif f == 1:   # Sub: a running sum per channel
            cur = np.cumsum(row.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:   # Up
            cur = (row + prev) % 256
        elif f in (3, 4):   # Average, Paeth: sequential in x
            cur = row.copy()
            for x in range(w * bpp):
                a = cur[x - bpp] if x >= bpp else 0
                c = prev[x - bpp] if x >= bpp else 0
                pred = (a + prev[x]) // 2 if f == 3 else _paeth(int(a), int(prev[x]), int(c))
                cur[x] = (row[x] + pred) % 256
        else:
            raise ValueError(f"bad PNG row filter {f}")
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)[:, :, :3].astype(np.uint8)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Images as the server sees them: clamped to [0, 1] and rounded to k/255 (float32)."""
    return torch.round(images.detach().float().clamp(0, 1) * 255) / 255


# ------------------------------------------------------------------------------------------ specs and URLs
def is_http_spec(spec) -> bool:
    """A reward spec that names a server: ``http://...``, ``https://...`` or the shorthand ``http:PORT``."""
    return isinstance(spec, str) and (spec.startswith(("http://", "https://")) or
                                      (spec.startswith("http:") and spec[5:].isdigit()))


def parse_url(spec: str) -> str:
    """The full URL of an HTTP reward spec (``http:PORT`` -> ``http://127.0.0.1:PORT/score``)."""
    if spec.startswith("http:") and spec[5:].isdigit():
        spec = f"http://127.0.0.1:{int(spec[5:])}{SHORTHAND_PATH}"
    u = urllib.parse.urlsplit(spec)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"reward spec {spec!r}: expected http://HOST:PORT/PATH or http:PORT")
    try:
        u.port
    except ValueError as e:
        raise ValueError(f"reward spec {spec!r}: bad port ({e})") from None
    return spec


def _loopback(host: str) -> bool:
    """Every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_http_spec(spec: str, allow_remote: bool = False, **_) -> str:
    """The URL of an HTTP reward spec, refused (ValueError) for a non-loopback host unless ``allow_remote``."""
    url = parse_url(spec)
    host = urllib.parse.urlsplit(url).hostname
    if not allow_remote and not _loopback(host):
        raise ValueError(f"reward server {url!r}: host {host!r} is not a loopback address; images and prompts "
                         "would travel unencrypted and unauthenticated to another machine, which then steers the "
                         "training. Serve the reward on 127.0.0.1, or set reward.kwargs.allow_remote: true if you "
                         "trust that network")
    return url


# ------------------------------------------------------------------------------------------ the client
class HttpReward:
    """A reward served over HTTP (the module docstring has the protocol): ``reward(images, prompts) -> (B,)``
    float32 on the images' device, no gradient.

    kwargs (``reward.kwargs``): ``timeout`` seconds per attempt (default 60), ``retries`` extra attempts after a
    connection failure, a timeout or HTTP 429/5xx (default 2), ``backoff`` seconds before the first retry, doubling
    (default 0.5), ``batch_size`` images per request (0: the whole batch), ``allow_remote`` (default False)."""

    differentiable = False

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 2, backoff: float = 0.5,
                 batch_size: int = 0, allow_remote: bool = False):
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"reward.kwargs.timeout must be > 0 seconds, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"reward.kwargs.retries must be an int >= 0, got {retries!r}")
        if not (isinstance(backoff, (int, float)) and backoff >= 0):
            raise ValueError(f"reward.kwargs.backoff must be >= 0 seconds, got {backoff!r}")
        if not (isinstance(batch_size, int) and batch_size >= 0):
            raise ValueError(f"reward.kwargs.batch_size must be an int >= 0, got {batch_size!r}")
        self.url = check_http_spec(url, allow_remote)
        self.timeout, self.retries, self.backoff, self.batch_size = float(timeout), retries, float(backoff), batch_size
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never an env proxy

    def __repr__(self):
        return f"HttpReward({self.url!r}, timeout={self.timeout:g}, retries={self.retries})"

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        if images.requires_grad and torch.is_grad_enabled():
            raise GradientUseError(f"reward server {self.url}: a served reward has no gradient; call it under "
                                   "torch.no_grad() (objective grpo does) or use a differentiable reward for DRaFT")
        prompts = list(prompts)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        step = self.batch_size or images.shape[0]
        scores = []
        for i in range(0, images.shape[0], step):
            scores += self.request(images[i:i + step], prompts[i:i + step])
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def request(self, images: torch.Tensor, prompts: list) -> list:
        """One POST: the scores of ``images`` as Python floats, or RewardServerError."""
        body = json.dumps({"version": PROTOCOL_VERSION, "prompts": prompts,
                           "images": [base64.b64encode(encode_png(x)).decode("ascii") for x in images]}).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    payload = resp.read()
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code not in RETRY_STATUS:
                    raise RewardServerError(f"reward server {self.url}: HTTP {e.code} {e.reason}{detail}") from None
                last = f"HTTP {e.code} {e.reason}{detail}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                    http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                last = ("timed out" if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason)
                        else f"{type(reason).__name__}: {reason}")
            else:
                return self._scores(payload, len(prompts))
        raise RewardServerError(f"reward server {self.url}: no answer after {self.retries + 1} attempt(s) "
                                f"(timeout {self.timeout:g} s each): {last}")

    def _scores(self, payload: bytes, n: int) -> list:
        bad = f"reward server {self.url}: bad answer: "
        try:
            data = json.loads(payload)
        except ValueError:
            raise RewardServerError(bad + f"not JSON ({payload[:80]!r})") from None
        scores = data.get("scores") if isinstance(data, dict) else None
        if not isinstance(scores, list):
            raise RewardServerError(bad + f'expected {{"scores": [...]}}, got {str(data)[:80]}')
        if len(scores) != n:
            raise RewardServerError(bad + f"{len(scores)} scores for {n} images")
        wrong = [s for s in scores if isinstance(s, bool) or not isinstance(s, (int, float))]
        if wrong:
            raise RewardServerError(bad + f"scores must be numbers, got {wrong[0]!r}")
        if not all(math.isfinite(s) for s in scores):
            raise RewardServerError(bad + f"non-finite score in {scores}")
        return [float(s) for s in scores]


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read(500).decode("utf-8", "replace")
        err = json.loads(text).get("error") if text.startswith("{") else text
    except Exception:  # noqa: BLE001 - best effort: the status is the error
        return ""
    return f": {str(err).strip()[:300]}" if err else ""


# ------------------------------------------------------------------------------------------ black boxes
class BlackBoxReward:
    """Any reward used as a black box: called under ``torch.no_grad()`` on detached images, scores detached;
    called where a gradient could be taken (grad enabled and images requiring grad) it raises
    :class:`GradientUseError`. Not an nn.Module: no parameters or layers of the wrapped reward are reachable
    (Grad-CAM on it fails too)."""

    differentiable = False

    def __init__(self, reward, name: str = ""):
        self._reward, self.name = reward, name or type(reward).__name__

    def __repr__(self):
        return f"BlackBoxReward({self.name})"

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        if images.requires_grad and torch.is_grad_enabled():
            raise GradientUseError(f"reward {self.name} is a black box: it gives scores, never a gradient (called "
                                   "with grad enabled on images that require grad)")
        with torch.no_grad():
            out = self._reward(images.detach(), prompts)
        return out.detach() if isinstance(out, torch.Tensor) else out
