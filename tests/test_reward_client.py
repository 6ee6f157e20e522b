"""Rewards without a gradient (issue 28 item 2): a reward served over HTTP (fnf.reward_client / fnf.reward_server,
against the fault-injecting server of tests/reward_server.py), score()'s conversions of a callable's return value,
the built-in specs under no_grad, and the black-box wrapper."""
import io
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from reward_server import reward_server  # noqa: E402

from fnf.reward_client import (  # noqa: E402
    BlackBoxReward, GradientUseError, HttpReward, RewardServerError, decode_png, encode_png, quantize,
)
from fnf.rewards import SpecError, brightness, build_reward, check_reward_spec, score  # noqa: E402

SEED = 20261207


def images(b=3, size=8, seed=SEED):
    print(f"seed {seed}")
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ PNG
def test_png_round_trip_is_the_8_bit_image():
    x = images(1, size=13)[0]
    want = np.rint(x.double().numpy() * 255).astype(np.uint8).transpose(1, 2, 0)
    got = decode_png(encode_png(x))
    assert got.dtype == np.uint8 and (got == want).all()
    assert torch.equal(torch.from_numpy(got).permute(2, 0, 1).float() / 255, quantize(x[None])[0])


def test_png_decoder_reads_pillows_filtered_pngs():
    """Pillow writes adaptive row filters (Sub, Up, Average, Paeth): the stdlib decoder reads them all."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(SEED)
    a = np.cumsum(rng.integers(0, 9, (24, 20, 3)), axis=1).astype(np.uint8)   # smooth rows: filters pay off
    for mode in ("RGB", "RGBA"):
        img = Image.fromarray(a if mode == "RGB" else np.dstack([a, np.full(a.shape[:2], 200, np.uint8)]), mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        assert (decode_png(buf.getvalue()) == a).all(), mode
    # and Pillow reads ours
    x = images(1, size=9)[0]
    back = np.asarray(Image.open(io.BytesIO(encode_png(x))).convert("RGB"))
    assert (back == np.rint(x.double().numpy() * 255).astype(np.uint8).transpose(1, 2, 0)).all()


def test_nan_image_is_refused_before_sending():
    x = images(1)[0]
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode_png(x)


# ------------------------------------------------------------------------------------------ the client
def test_served_scores_equal_the_in_process_reward():
    x = images()
    with reward_server(brightness()) as srv:
        port = srv.server_address[1]
        for spec in (srv.url, f"http:{port}", f"http://localhost:{port}/any/path"):
            r = build_reward(spec)
            with torch.no_grad():
                got = score(r, x, PROMPTS, finite=True)
            assert got.dtype == torch.float32 and got.shape == (3,)
            torch.testing.assert_close(got, brightness()(quantize(x)), rtol=0, atol=1e-7)   # what the server saw
            torch.testing.assert_close(got, x.mean(dim=(1, 2, 3)), rtol=0, atol=1 / 255)    # the 8-bit rounding
        assert len(srv.requests) == 3


def test_batch_size_splits_requests_in_order():
    x = images(5)
    with reward_server(brightness()) as srv:
        got = HttpReward(srv.url, batch_size=2)(x, PROMPTS + ["x", "y"])
        assert len(srv.requests) == 3
    torch.testing.assert_close(got, brightness()(quantize(x)), rtol=0, atol=1e-7)


def test_timeout_gives_one_clear_error():
    with reward_server(brightness(), faults=["sleep:3"]) as srv:
        with pytest.raises(RewardServerError, match=r"no answer after 1 attempt.*timeout 0.3 s.*timed out"):
            HttpReward(srv.url, timeout=0.3, retries=0)(images(), PROMPTS)


def test_retry_then_success():
    x = images()
    with reward_server(brightness(), faults=["503", "close", "sleep:2"]) as srv:
        got = HttpReward(srv.url, timeout=0.5, retries=3, backoff=0)(x, PROMPTS)
        assert len(srv.requests) == 4
    torch.testing.assert_close(got, brightness()(quantize(x)), rtol=0, atol=1e-7)


def test_retries_exhausted_names_the_last_error():
    with reward_server(brightness(), faults=["503", "500", "502"]) as srv:
        with pytest.raises(RewardServerError, match=r"3 attempt\(s\).*HTTP 502.*injected 502"):
            HttpReward(srv.url, retries=2, backoff=0)(images(), PROMPTS)
        assert len(srv.requests) == 3


def test_connection_refused_is_retried_then_reported():
    port = free_port()
    with pytest.raises(RewardServerError, match=r"2 attempt\(s\).*(Refused|refused)"):
        HttpReward(f"http:{port}", retries=1, backoff=0)(images(), PROMPTS)


@pytest.mark.parametrize("fault, message", [
    ("400", r"HTTP 400.*injected 400"),
    ("count", r"2 scores for 3 images"),
    ("nan", r"non-finite score"),
    ("string", r"scores must be numbers, got '0.5'"),
    ("notjson", r"not JSON"),
    ("noscores", r'expected \{"scores"'),
])
def test_bad_responses_raise_without_retry(fault, message):
    with reward_server(brightness(), faults=[fault]) as srv:
        with pytest.raises(RewardServerError, match=message):
            HttpReward(srv.url, retries=3, backoff=0)(images(), PROMPTS)
        assert len(srv.requests) == 1   # a malformed answer would come again: not retried


def test_a_failing_reward_is_reported_not_zero():
    def broken(images, prompts):
        raise RuntimeError("model not loaded")
    with reward_server(broken) as srv:
        with pytest.raises(RewardServerError, match="HTTP 500.*model not loaded"):
            HttpReward(srv.url, retries=1, backoff=0)(images(), PROMPTS)


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000/score", "http://192.168.0.7:80/", "http://example.com/r",
                                 "https://8.8.8.8/score"])
def test_non_loopback_hosts_are_refused_unless_allowed(url):
    with pytest.raises(SpecError, match="not a loopback address.*allow_remote"):
        build_reward(url)
    with pytest.raises(SpecError, match="not a loopback address"):
        check_reward_spec(url, {})
    r = build_reward(url, allow_remote=True)   # allowed: built, nothing sent
    assert isinstance(r, HttpReward) and r.url == url
    check_reward_spec(url, {"allow_remote": True})


def test_loopback_forms_and_bad_specs():
    for url in ("http://127.0.0.1:9/s", "http://127.8.9.10:9/s", "http://[::1]:9/s", "http://localhost:9/s"):
        assert HttpReward(url).url == url
    assert HttpReward("http:8123").url == "http://127.0.0.1:8123/score"
    with pytest.raises(SpecError, match="timeout"):
        build_reward("http:8123", timeout=0)
    with pytest.raises(SpecError, match="retries"):
        build_reward("http:8123", retries=-1)
    with pytest.raises(SpecError, match="unexpected keyword|got an unexpected"):
        check_reward_spec("http:8123", {"tries": 3})
    with pytest.raises(SpecError, match="bad port"):
        build_reward("http://127.0.0.1:99999/s")


def test_served_reward_refuses_a_gradient():
    x = images().requires_grad_(True)
    with pytest.raises(GradientUseError, match="no gradient"):
        HttpReward("http:9")(x, PROMPTS)


def test_server_command_serves_a_builtin(tmp_path):
    """`python -m fnf.reward_server --reward contrast --port 0`: its printed URL answers like the reward."""
    proc = subprocess.Popen([sys.executable, "-m", "fnf.reward_server", "--reward", "contrast", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.path.dirname(HERE))
    try:
        line = proc.stdout.readline()
        assert line.startswith("fnf reward server: contrast on http://127.0.0.1:"), (line, proc.stderr.read())
        x = images()
        got = build_reward(line.split()[-1])(x, PROMPTS)
        torch.testing.assert_close(got, build_reward("contrast")(quantize(x)), rtol=0, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([sys.executable, "-m", "fnf.reward_server", "--reward", "nope"], capture_output=True,
                         text=True, cwd=os.path.dirname(HERE))
    assert bad.returncode == 2 and "unknown reward 'nope'" in bad.stderr


# ------------------------------------------------------------------------------------------ in-process rewards
def test_score_converts_numpy_and_lists_and_checks_them():
    x = images()
    want = x.mean(dim=(1, 2, 3))
    for ret in (want.numpy().astype(np.float64), want.tolist(), want.numpy()[:, None], [1, 2, 3]):
        with torch.no_grad():
            got = score(lambda i, p: ret, x, PROMPTS, finite=True)
        assert got.dtype == torch.float32 and got.device == x.device
        assert torch.equal(got, torch.as_tensor(np.asarray(ret, dtype=np.float64)).reshape(3).float())
    with pytest.raises(ValueError, match=r"shape \(2,\); expected \(3,\)"):
        score(lambda i, p: [0.1, 0.2], x, PROMPTS)
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"):
        score(lambda i, p: np.zeros((3, 2)), x, PROMPTS)
    with pytest.raises(TypeError, match="not numbers"):
        score(lambda i, p: ["good", "bad", "ugly"], x, PROMPTS)
    with pytest.raises(TypeError, match="not numbers"):
        score(lambda i, p: None, x, PROMPTS)
    with pytest.raises(TypeError, match="complex"):
        score(lambda i, p: torch.zeros(3, dtype=torch.complex64), x, PROMPTS)
    with pytest.raises(ValueError, match="non-finite"):
        score(lambda i, p: [0.1, float("nan"), 0.3], x, PROMPTS, finite=True)
    assert score(lambda i, p: [0.1, float("nan"), 0.3], x, PROMPTS).isnan().any()   # default: the trainer's check


@pytest.mark.parametrize("spec, kwargs", [("brightness", {}), ("darkness", {}), ("redness", {}), ("saturation", {}),
                                          ("contrast", {}), ("region", {"statistic": "redness"}),
                                          ("classifier", {"model": "fnf.classifiers:resnet", "logit": 1, "model_kwargs": {
                                              "arch": "resnet18", "width": 8, "random_init": True}}),
                                          ("fnf_tiny_models:red_detector", {}),
                                          ("fnf.toy.rewards:defect_reward", {})])
def test_builtin_specs_work_under_no_grad(spec, kwargs):
    torch.manual_seed(0)
    x = images(size=16)
    r = build_reward(spec, **kwargs)
    if isinstance(r, torch.nn.Module):
        r.eval()
    with torch.no_grad():
        got = score(r, x, PROMPTS, finite=True)
    assert got.shape == (3,) and not got.requires_grad and torch.isfinite(got).all()
    xg = x.clone().requires_grad_(True)
    with_grad = score(r, xg, PROMPTS)
    torch.testing.assert_close(got, with_grad.detach(), rtol=1e-6, atol=1e-6)
    blind = BlackBoxReward(r, spec)
    torch.testing.assert_close(score(blind, x, PROMPTS), got, rtol=0, atol=0)
    with pytest.raises(GradientUseError, match="black box"):
        blind(xg, PROMPTS)


# ------------------------------------------------------------------------------------------ in the trainer
@pytest.mark.slow
def test_grpo_trains_on_a_served_reward_and_draft_refuses_it(tmp_path_factory, tmp_path):
    """objective grpo scores its rollout through the server (no gradient needed); DRaFT-K, which needs the reward's
    gradient, gets one clear GradientUseError instead of a silent zero gradient."""
    from fnf.train import train
    from fnf_tiny_models import cached_model, tiny_config

    sd = cached_model("sd", str(tmp_path_factory.getbasetemp()))
    with reward_server(brightness()) as srv:
        cfg = tiny_config(sd, str(tmp_path / "grpo"), reward={"spec": srv.url, "kwargs": {"timeout": 30}},
                          objective={"name": "grpo", "beta": 0.0}, localize={"spec": "none"},
                          grpo={"group_size": 2}, train={"steps": 1, "batch_size": 2, "grad_accum": 4})
        res = train(cfg)
        assert len(srv.requests) == 1 and len(res.history) == 1 and not res.history[0].get("skipped")
        assert np.isfinite(res.history[0]["reward"])
        cfg = tiny_config(sd, str(tmp_path / "draft"), reward={"spec": srv.url}, objective={"beta": 0.0},
                          train={"steps": 1})
        with pytest.raises(GradientUseError, match="no gradient"):
            train(cfg)
