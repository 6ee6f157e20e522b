"""A tiny reward server for tests (fnf.reward_server's handler, in a thread), with faults to inject.

    with reward_server(brightness()) as srv:                 # srv.url, srv.requests (bodies received)
        HttpReward(srv.url)(images, prompts)
    with reward_server(r, faults=["503", "ok"]) as srv: ...  # the first request answers 503, then normal

Faults, one per request in order (then "ok"): "ok"; an HTTP status such as "503" or "400"; "sleep:S" (wait S
seconds, then answer normally); "count" (one score too few); "nan"; "string" (a score that is a string); "notjson";
"noscores" ({"result": ...}); "close" (drop the connection without an answer).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import ThreadingHTTPServer

from fnf.reward_server import RewardHandler, decode_request
from fnf.rewards import score


class FaultyHandler(RewardHandler):
    def do_POST(self):  # noqa: N802
        srv = self.server
        with srv.lock:
            fault = srv.faults.pop(0) if srv.faults else "ok"
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv.requests.append(body)
        if fault.startswith("sleep:"):
            time.sleep(float(fault[6:]))
            fault = "ok"
        if fault.isdigit():
            return self.answer(int(fault), {"error": f"injected {fault}"})
        if fault == "close":
            self.close_connection = True
            self.connection.shutdown(2)
            return None
        if fault == "ok":
            return self.respond(body)
        images, prompts = decode_request(body)
        scores = score(srv.reward, images, prompts).tolist()
        if fault == "count":
            scores = scores[:-1]
        elif fault == "nan":
            scores[0] = float("nan")
        elif fault == "string":
            scores[0] = "0.5"
        if fault == "notjson":
            data = b"<html>oops</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        if fault == "nan":   # json.dumps writes NaN, as a careless server would
            return self.answer(200, {"scores": scores})
        return self.answer(200, {"result": scores} if fault == "noscores" else {"scores": scores})


@contextlib.contextmanager
def reward_server(reward, faults=()):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyHandler)
    server.daemon_threads = True
    server.reward, server.faults, server.requests, server.lock = reward, list(faults), [], threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/score"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
