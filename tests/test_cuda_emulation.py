"""The CUDA kernels of csrc/cuda executed on CPU: their own source compiled as host C++ with the emulation
of tests/cuda_emulation (a fiber per CUDA thread, block barriers, warp shuffles, launch checks, deadlock and
timeout detection, half/bfloat16 with round-to-nearest-even) under AddressSanitizer and UBSan, compared with
the float64 reference in fp32/fp16/bf16/fp64. Builds are cached under $TMPDIR/fnf-cuda-emulation."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fnf_kernels import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emulation")
SEED = 20240624
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ or clang++; or set CXX) to build the "
                                                    "CUDA emulation harness")

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.bool: 4,
              torch.uint8: 5}
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CACHE = os.path.join(tempfile.gettempdir(), "fnf-cuda-emulation")
# -O0 -g1: a third of -O1's compile time, line numbers in the sanitizer reports.
BASE_FLAGS = ["-std=c++17", "-O0", "-g1", "-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror",
              "-Wno-unknown-pragmas"]
RUN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "FNF_EMU_TIMEOUT": "120"}


# ---- building ------------------------------------------------------------------------------------------------
_sanitizers: list[str] | None = None


def sanitizer_flags() -> list[str]:
    """-fsanitize=address,undefined where it links, else address alone, else none (said in the test output)."""
    global _sanitizers
    if _sanitizers is None:
        _sanitizers = []
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write("int main() { return 0; }\n")
            for flags in (["-fsanitize=address,undefined", "-fno-sanitize-recover=all"], ["-fsanitize=address"]):
                done = subprocess.run([CXX, *flags, src, "-o", os.path.join(tmp, "probe")], capture_output=True)
                if done.returncode == 0:
                    _sanitizers = flags
                    break
    return _sanitizers


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _headers(csrc: str) -> bytes:
    names = []
    for folder in (os.path.join(csrc, "include", "fnf"), os.path.join(EMU, "include")):
        names += sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".h"))
    return b"".join(open(n, "rb").read() for n in names)


def build(csrc: str = os.path.join(ROOT, "csrc"), defines: tuple = ()) -> str:
    """The driver executable built from ``csrc`` (the repository's or a patched copy), cached by content."""
    flags = BASE_FLAGS + sanitizer_flags()
    includes = ["-I", os.path.join(EMU, "include"), "-I", os.path.join(csrc, "include")]
    headers = _headers(csrc)
    sources = [os.path.join(csrc, "cuda", "penalty.cu"), os.path.join(csrc, "cuda", "dilate.cu"),
               os.path.join(csrc, "cuda", "norm_silu.cu"), os.path.join(csrc, "cuda", "rms_norm_silu.cu"),
               os.path.join(EMU, "driver.cpp"), os.path.join(EMU, "selftest_kernels.cpp")]
    os.makedirs(CACHE, exist_ok=True)
    objects = []
    for src in sources:
        src_flags = flags + [f"-D{d}" for d in defines] if src.endswith(".cu") else flags
        key = _digest(CXX, src_flags, headers, open(src, "rb").read())
        objects.append((src, src_flags, os.path.join(CACHE, f"{os.path.basename(src)}-{key}.o")))

    def compile_one(item):
        src, src_flags, obj = item
        if os.path.exists(obj):
            return None
        tmp = f"{obj}.{os.getpid()}.tmp"
        done = subprocess.run([CXX, *src_flags, *includes, "-x", "c++", "-c", src, "-o", tmp], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            return f"{src}:\n{done.stderr[-6000:]}"
        os.replace(tmp, obj)
        return None

    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = [e for e in pool.map(compile_one, objects) if e]
    if errors:
        raise AssertionError("the CUDA emulation build failed:\n" + "\n".join(errors))
    exe = os.path.join(CACHE, "driver-" + _digest(*(o for *_, o in objects)))
    if not os.path.exists(exe):
        tmp = f"{exe}.{os.getpid()}.tmp"
        done = subprocess.run([CXX, *sanitizer_flags(), *(o for *_, o in objects), "-o", tmp], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-6000:]
        os.replace(tmp, exe)
    return exe


@pytest.fixture(scope="module")
def driver():
    print(f"CUDA emulation: {CXX} {' '.join(sanitizer_flags()) or '(no sanitizer builds here)'}")
    return build()


@pytest.fixture(scope="module")
def driver_small_grid():
    """gridDim.y limited to 3 (FNF_MAX_GRID_Y): batches and planes beyond it take the grid-striding paths."""
    return build(defines=("FNF_MAX_GRID_Y=3",))


def run(exe: str, script: str, folder: str, env: dict | None = None, timeout: int = 300):
    path = os.path.join(folder, "script.txt")
    with open(path, "w") as f:
        f.write(script)
    return subprocess.run([exe, path], capture_output=True, text=True, timeout=timeout, cwd=folder,
                          env={**os.environ, **RUN_ENV, **(env or {})})


# ---- tensors <-> files ---------------------------------------------------------------------------------------
def storage_spec(t: torch.Tensor, folder: str, name: str) -> str:
    """'path numel offset sizes... strides...' of t's whole storage, written to a file."""
    storage = t.untyped_storage()
    path = os.path.join(folder, name + ".bin")
    with open(path, "wb") as f:
        f.write(ctypes.string_at(storage.data_ptr(), storage.nbytes()) if storage.nbytes() else b"")
    numel = storage.nbytes() // t.element_size()
    return " ".join(str(v) for v in [path, numel, t.storage_offset(), *t.shape, *t.stride()])


def write_tensor(t: torch.Tensor, folder: str, name: str) -> str:
    path = os.path.join(folder, name + ".bin")
    t = t.contiguous()
    with open(path, "wb") as f:
        f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
    return path


def read_tensor(path: str, dtype: torch.dtype) -> torch.Tensor:
    data = bytearray(open(path, "rb").read())
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).clone()


def check_run(done, expect_lines: int):
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"the emulated kernels failed (exit {done.returncode}):\n{out[-8000:]}"
    results = [line for line in done.stdout.splitlines() if line[:2] in ("P ", "D ", "G ", "R ")]
    assert len(results) == expect_lines, out[-4000:]
    bad = [line for line in results if not line.endswith(("err=0", "err=0,0"))]
    assert not bad, f"launch errors: {bad}"
    return results


# ---- cases ---------------------------------------------------------------------------------------------------
def _fill(shape, dtype, gen, special=False):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if special:  # NaN, +Inf and -Inf at fixed places of the first sample
        flat = x.view(-1)
        n = flat.numel()
        flat[n // 7] = float("nan")
        flat[min(n - 1, 3)] = float("inf")
        flat[n // 2] = -float("inf")
    return x.to(dtype)


def penalty_cases(dtype, gen):
    """(name, image, reference, mask) with odd sizes, chunk tails, batch 1 and > 1, several layouts."""
    cases = []
    img = _fill((1, 3, 5, 7), dtype, gen)
    cases.append(("tiny", img, _fill(img.shape, dtype, gen), torch.rand(1, 1, 5, 7, generator=gen).to(dtype)))
    img = _fill((2, 3, 37, 61), dtype, gen).contiguous(memory_format=torch.channels_last)
    cases.append(("channels_last", img, _fill(img.shape, dtype, gen).contiguous(memory_format=torch.channels_last),
                  (torch.rand(2, 1, 37, 61, generator=gen) * 1.4 - 0.2).to(dtype)))
    img = _fill((3, 2, 45, 50), dtype, gen)  # 2250 elements per plane: one full chunk of 2048 and a tail
    cases.append(("two_chunks", img, _fill(img.shape, dtype, gen), torch.rand(3, 2, 45, 50, generator=gen).to(dtype)))
    big = _fill((2, 4, 9, 23), dtype, gen)
    img = big[:, :, :, 1::2]  # strided, offset view: not dense
    refr = _fill((2, 4, 11, 9), dtype, gen).transpose(2, 3)  # (2, 4, 9, 11) with H/W strides swapped
    mask = torch.rand(1, 1, 9, 11, generator=gen).to(dtype).expand(2, 1, 9, 11)  # batch stride 0
    cases.append(("strided", img, refr, mask))
    img = _fill((2, 3, 6, 5), dtype, gen, special=True)  # NaN / Inf in sample 0
    cases.append(("nan_inf", img, _fill(img.shape, dtype, gen), torch.rand(2, 3, 6, 5, generator=gen).to(dtype)))
    one = _fill((1, 1, 1, 1), dtype, gen)
    cases.append(("single", one, _fill(one.shape, dtype, gen), torch.zeros(1, 1, 1, 1, dtype=dtype)))
    return cases


def striding_penalty_cases(dtype, gen):
    img = _fill((5, 3, 13, 17), dtype, gen)  # 15 planes over gridDim.y = 3
    m = torch.rand(5, 1, 13, 17, generator=gen).to(dtype)
    cl = _fill((4, 2, 47, 49), dtype, gen).contiguous(memory_format=torch.channels_last)  # 8 planes, 2 chunks each
    return [("stride_planes", img, _fill(img.shape, dtype, gen), m),
            ("stride_cl", cl, _fill(cl.shape, dtype, gen), torch.rand(4, 2, 47, 49, generator=gen).to(dtype))]


def run_penalty(exe, cases, dtype, folder, gen, env=None):
    """Runs every case through penalty_partials and penalty_backward; returns [(name, norms, grad, expected)]."""
    lines, expected = [], []
    acc = ref.accumulate_dtype(dtype)
    for name, img, refr, mask in cases:
        squared = len(expected) % 2 == 0
        want = ref.penalty_norms(img.double(), refr.double(), mask.double(), squared=True)
        norms = (want if squared else want.sqrt()).to(acc)
        g = torch.randn(img.shape[0], generator=gen, dtype=torch.float64).to(acc)
        if squared:
            coef = g * 2
        else:
            coef = torch.where(norms > 0, g / norms, torch.where(norms == norms, torch.zeros_like(norms), norms))
        grad_out = torch.empty_like(img)  # the layout bindings_cuda.cpp gives the gradient
        w = 1 - mask.double().clamp(0, 1)
        grad_want = (-coef.double().view(-1, 1, 1, 1) * w * w * (refr.double() - img.double()))
        lines.append(" ".join(["P", str(DTYPE_CODE[dtype]), os.path.join(folder, name),
                               storage_spec(img, folder, name + "_x"), storage_spec(refr, folder, name + "_r"),
                               storage_spec(mask, folder, name + "_m"), write_tensor(coef, folder, name + "_c"),
                               str(grad_out.untyped_storage().nbytes() // grad_out.element_size()),
                               str(grad_out.storage_offset()), *map(str, grad_out.stride())]))
        expected.append((name, img, want, grad_out, grad_want))
    done = run(exe, "\n".join(lines) + "\n", folder, env)
    check_run(done, len(cases))
    results = []
    for name, img, want, grad_out, grad_want in expected:
        partials = read_tensor(os.path.join(folder, name + ".partials"), acc)
        # As bindings_cuda.cpp: partials viewed (B, D0 * chunks) and summed in the accumulate dtype.
        sumsq = partials.view(img.shape[0], -1).sum(1) if img.numel() else torch.zeros(img.shape[0], dtype=acc)
        storage = read_tensor(os.path.join(folder, name + ".grad"), dtype)
        grad = storage.as_strided(grad_out.shape, grad_out.stride(), grad_out.storage_offset())
        results.append((name, sumsq, want, grad, grad_want))
    return results, done


def compare_penalty(results, dtype):
    acc = ref.accumulate_dtype(dtype)
    for name, sumsq, want, grad, grad_want in results:
        # Sums of squares in the accumulate dtype: a few eps per level of the reduction tree.
        torch.testing.assert_close(sumsq.double(), want, rtol=64 * torch.finfo(acc).eps, atol=0, equal_nan=True,
                                   msg=lambda m: f"{name} norms ({dtype}): {m}")
        # The gradient: a few roundings in the accumulate dtype, then one to dtype.
        torch.testing.assert_close(grad.double(), grad_want.to(dtype).double(), rtol=4 * torch.finfo(dtype).eps,
                                   atol=4 * torch.finfo(dtype).tiny, equal_nan=True,
                                   msg=lambda m: f"{name} gradient ({dtype}): {m}")


def dilation_cases(dtype, gen):
    """(name, heatmap, threshold, radius, disk, out_dtype)."""
    out_dtypes = [torch.float32, torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64]
    cases = []
    shapes = [("tiny", (1, 1, 1)), ("odd", (2, 37, 45)), ("tall", (3, 70, 33)), ("wide", (1, 9, 75)),
              ("col", (2, 100, 1))]
    k = 0
    for name, shape in shapes:
        hm = torch.rand(shape, generator=gen, dtype=torch.float64)
        hm.view(-1)[:: 11] = float("nan") if name == "odd" else hm.view(-1)[:: 11]
        hm = hm.to(dtype)
        thr = torch.full((shape[0],), 0.97, dtype=ref.accumulate_dtype(dtype))
        for radius in sorted({0, 1, 3, shape[1] + shape[2]}):
            for disk in (False, True):
                cases.append((f"{name}_r{radius}_{'disk' if disk else 'square'}", hm, thr, radius, disk,
                              out_dtypes[k % len(out_dtypes)]))
                k += 1
    base = torch.rand(2, 41, 29, generator=gen, dtype=torch.float64).to(dtype)
    thr = torch.tensor([0.9, 0.95], dtype=ref.accumulate_dtype(dtype))
    cases.append(("transposed", base.transpose(1, 2), thr, 2, True, torch.float32))  # (2, 29, 41), x stride 29
    cases.append(("sliced", base[:, 3:, ::3], thr, 4, False, torch.uint8))  # offset, x stride 3
    cases.append(("expanded", base[:1].expand(2, 41, 29), thr, 1, True, torch.bool))  # batch stride 0
    inf = torch.rand(1, 8, 40, generator=gen, dtype=torch.float64)
    inf[0, 2, 5], inf[0, 6, 33] = float("inf"), -float("inf")
    cases.append(("inf", inf.to(dtype), torch.tensor([0.99], dtype=ref.accumulate_dtype(dtype)), 2, False,
                  torch.float32))
    return cases


def striding_dilation_cases(dtype, gen):
    hm = torch.rand(7, 70, 37, generator=gen, dtype=torch.float64).to(dtype)  # 7 images over gridDim.y = 3;
    thr = torch.full((7,), 0.95, dtype=ref.accumulate_dtype(dtype))  # 490 rows over 48 row blocks of 8
    return [("stride_batch_sq", hm, thr, 2, False, torch.float32), ("stride_batch_disk", hm, thr, 5, True, torch.bool)]


def run_dilation(exe, cases, dtype, folder, env=None):
    lines = []
    for name, hm, thr, radius, disk, out_dtype in cases:
        lines.append(" ".join(["D", str(DTYPE_CODE[dtype]), str(DTYPE_CODE[out_dtype]), os.path.join(folder, name),
                               storage_spec(hm, folder, name + "_h"), write_tensor(thr, folder, name + "_t"),
                               str(radius), str(int(disk))]))
    done = run(exe, "\n".join(lines) + "\n", folder, env)
    check_run(done, len(cases))
    for name, hm, thr, radius, disk, out_dtype in cases:
        raw = read_tensor(os.path.join(folder, name + ".out"), torch.uint8 if out_dtype == torch.bool else out_dtype)
        out = raw.view(hm.shape)
        want = ref.threshold_dilate(hm, thr, radius, "disk" if disk else "square", out_dtype)
        if out_dtype == torch.bool:
            want = want.to(torch.uint8)
        torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{name} ({dtype} -> {out_dtype}, r={radius}): {m}")
    return done


def norm_cases(dtype, gen):
    """(name, x, groups, weight, bias, silu): odd sizes, chunk tails, one group, C groups, layouts, a large mean."""
    acc = ref.accumulate_dtype(dtype)

    def affine(c):
        return (torch.randn(c, generator=gen, dtype=torch.float64).to(acc),
                torch.randn(c, generator=gen, dtype=torch.float64).to(acc))

    cases = [("tiny", _fill((1, 4, 3, 5), dtype, gen), 2, *affine(4), True)]
    x = _fill((2, 6, 37, 61), dtype, gen).contiguous(memory_format=torch.channels_last)  # 2257: 3 chunks per plane
    cases.append(("channels_last", x, 3, *affine(6), True))
    cases.append(("c_groups_plain", _fill((2, 5, 9, 11), dtype, gen), 5, None, None, False))
    cases.append(("one_group", _fill((1, 7, 33, 40), dtype, gen), 1, affine(7)[0], None, True))
    offset = (_fill((2, 4, 20, 3), torch.float64, gen) * 0.5 + 8).to(dtype)  # mean >> std: Chan's merge
    cases.append(("offset", offset, 2, None, affine(4)[1], True))
    cases.append(("three_d", _fill((3, 12, 70), dtype, gen), 4, *affine(12), True))
    return cases


def _ncs(t: torch.Tensor) -> torch.Tensor:
    """t (N, C, *) as an (N, C, S) view of its storage (spatial dims that merge, as the bindings require)."""
    s = t[0, 0].numel() if t.shape[0] and t.shape[1] else 0
    ss = t.stride(-1) if t.dim() > 2 else 1
    return t.as_strided((t.shape[0], t.shape[1], s), (t.stride(0), t.stride(1), ss), t.storage_offset())


def run_norm(exe, cases, dtype, folder, gen):
    """Runs every case through group_norm_silu_forward/backward; compares with autograd of the float64 reference."""
    lines, expected = [], []
    acc = ref.accumulate_dtype(dtype)
    for name, x, groups, w, b, silu in cases:
        grad = _fill(x.shape, dtype, gen).contiguous(memory_format=torch.channels_last) if x.dim() == 4 and \
            x.stride(1) == 1 else _fill(x.shape, dtype, gen)
        out = torch.empty_like(x)
        wpath = write_tensor(w, folder, name + "_w") if w is not None else "-"
        bpath = write_tensor(b, folder, name + "_b") if b is not None else "-"
        lines.append(" ".join(["G", str(DTYPE_CODE[dtype]), os.path.join(folder, name),
                               storage_spec(_ncs(x), folder, name + "_x"), str(groups), "1e-5", str(int(silu)), wpath,
                               bpath, storage_spec(_ncs(grad), folder, name + "_g"),
                               str(out.numel()), *map(str, _ncs(out).stride()), str(out.numel()),
                               *map(str, _ncs(out).stride())]))
        xd = x.double().requires_grad_()
        wd = w.double().requires_grad_() if w is not None else None
        bd = b.double().requires_grad_() if b is not None else None
        want = ref.group_norm_silu_reference(xd, groups, wd, bd, 1e-5, silu)
        leaves = [t for t in (xd, wd, bd) if t is not None]
        grads = torch.autograd.grad(want, leaves, grad.double())
        g = xd.detach().reshape(x.shape[0], groups, -1)
        expected.append((name, x, out, want.detach(), grads, w is not None, b is not None, g.mean(2),
                         g.var(2, correction=0)))
    done = run(exe, "\n".join(lines) + "\n", folder)
    check_run(done, len(cases))
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-13}[dtype]

    def close(name, what, got, want, scale):
        err = float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-30)
        assert err <= scale * tol, f"{name} {what} ({dtype}): relative error {err:.3g} > {scale * tol:.3g}"

    for name, x, out, want, grads, has_w, has_b, mean, var in expected:
        got = read_tensor(os.path.join(folder, name + ".out"), dtype).as_strided(out.shape, out.stride())
        close(name, "out", got, want, 4)
        close(name, "mean", read_tensor(os.path.join(folder, name + ".mean"), acc).view(mean.shape), mean, 1)
        rstd = read_tensor(os.path.join(folder, name + ".rstd"), acc).view(var.shape)
        close(name, "rstd", rstd, torch.rsqrt(var + 1e-5), 4)
        dx = read_tensor(os.path.join(folder, name + ".dx"), dtype).as_strided(out.shape, out.stride())
        close(name, "dx", dx, grads[0], 8)
        k = 1
        if has_w:
            close(name, "dweight", read_tensor(os.path.join(folder, name + ".sdyx"), acc).view(x.shape[:2]).sum(0),
                  grads[k], 8)
            k += 1
        if has_b:
            close(name, "dbias", read_tensor(os.path.join(folder, name + ".sdy"), acc).view(x.shape[:2]).sum(0),
                  grads[k], 8)
    return done


def rms_cases(dtype, gen):
    """(name, x, dim, weight, silu, need_x, need_weight): the (O, D, I) walks the op takes (columns on 32 lanes,
    D on the lanes, D past the block's rows, tails), no weight, no SiLU, dweight alone, dx alone."""
    acc = ref.accumulate_dtype(dtype)

    def weight(d):
        return torch.randn(d, generator=gen, dtype=torch.float64).to(acc) + 1

    return [("nchw_dim1", _fill((2, 6, 5, 7), dtype, gen), 1, weight(6), True, True, True),
            ("channels_last_dim1", _fill((2, 6, 5, 7), dtype, gen).contiguous(memory_format=torch.channels_last), 1,
             weight(6), True, True, True),
            ("last_dim_long", _fill((3, 300), dtype, gen), 1, weight(300), True, True, True),
            ("dim0_plain", _fill((3, 6, 5), dtype, gen), 0, None, False, True, False),
            ("many_rows", _fill((1, 37, 40), dtype, gen), 1, weight(37), True, False, True),
            ("five_d", _fill((2, 4, 3, 4, 5), dtype, gen), 1, weight(4), True, True, True)]


def _odi(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t viewed as (O, D, I) around ``dim`` (the dims before and after it each merged into one stride)."""
    def merged(shape, strides):
        dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
        for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
            assert s0 == n1 * s1, "dims do not merge"
        return (dims[-1][1] if dims else 1), int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else 1

    so, o = merged(t.shape[:dim], t.stride()[:dim])
    si, i = merged(t.shape[dim + 1:], t.stride()[dim + 1:])
    return t.as_strided((o, t.shape[dim], i), (so, t.stride(dim), si), t.storage_offset())


def run_rms(exe, cases, dtype, folder, gen):
    """Runs every case through rms_norm_silu_forward/backward; compares with autograd of the float64 reference."""
    lines, expected = [], []
    acc = ref.accumulate_dtype(dtype)
    for name, x, dim, w, silu, need_x, need_w in cases:
        grad = _fill(x.shape, dtype, gen)
        out = torch.empty_like(x)
        wpath = write_tensor(w, folder, name + "_w") if w is not None else "-"
        lines.append(" ".join(["R", str(DTYPE_CODE[dtype]), os.path.join(folder, name),
                               storage_spec(_odi(x, dim), folder, name + "_x"), "1e-6", str(int(silu)), wpath,
                               storage_spec(_odi(grad, dim), folder, name + "_g"),
                               str(out.numel()), *map(str, _odi(out, dim).stride()), str(out.numel()),
                               *map(str, _odi(out, dim).stride()), str(int(need_x)),
                               str(int(need_w and w is not None))]))
        xd = x.double().requires_grad_()
        wd = w.double().requires_grad_() if w is not None else None
        want = ref.rms_norm_silu_reference(xd, wd, 1e-6, dim=dim, silu=silu)
        grads = torch.autograd.grad(want, [t for t in (xd, wd) if t is not None], grad.double())
        rstd = torch.rsqrt(xd.detach().pow(2).mean(dim) + 1e-6)
        expected.append((name, x, dim, out, want.detach(), grads, rstd, need_x, need_w and w is not None))
    done = run(exe, "\n".join(lines) + "\n", folder)
    results = check_run(done, len(cases))
    tol = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-13}[dtype]

    def close(name, what, got, want, scale):
        err = float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-30)
        assert err <= scale * tol, f"{name} {what} ({dtype}): relative error {err:.3g} > {scale * tol:.3g}"

    for (name, x, dim, out, want, grads, rstd, need_x, need_w), line in zip(expected, results):
        got = read_tensor(os.path.join(folder, name + ".out"), dtype).as_strided(out.shape, out.stride())
        close(name, "out", got, want, 4)
        close(name, "rstd", read_tensor(os.path.join(folder, name + ".rstd"), acc).view(rstd.shape), rstd, 4)
        if need_x:
            dx = read_tensor(os.path.join(folder, name + ".dx"), dtype).as_strided(out.shape, out.stride())
            close(name, "dx", dx, grads[0], 8)
        if need_w:
            blocks = int(re.search(r"blocks=(\d+)", line).group(1))
            part = read_tensor(os.path.join(folder, name + ".part"), acc).view(blocks, x.shape[dim])
            close(name, "dweight", part.sum(0), grads[1], 8)
    return results


def generator(label: str) -> torch.Generator:
    seed = SEED + int(hashlib.sha256(label.encode()).hexdigest()[:6], 16)
    print(f"{label}: seed {seed}")
    return torch.Generator().manual_seed(seed)


# ---- tests ---------------------------------------------------------------------------------------------------
def test_emulator_runs_indices_and_shuffles(driver, tmp_path):
    done = run(driver, "T indices\nT shuffles\n", str(tmp_path))
    assert done.returncode == 0 and "T indices rc=0" in done.stdout and "T shuffles rc=0" in done.stdout, \
        done.stdout + done.stderr


@pytest.mark.parametrize("case", ["zero_grid", "grid_y", "grid_z", "big_block", "block_2d", "zero_block",
                                  "big_smem"])
def test_emulator_refuses_bad_launch_configs(driver, tmp_path, case):
    done = run(driver, f"T {case}\n", str(tmp_path))
    assert done.returncode == 0 and f"T {case} rc=0" in done.stdout, done.stdout + done.stderr
    assert "refused" in done.stderr and "launch error 9" in done.stdout


@pytest.mark.parametrize("case, message", [
    ("deadlock", "deadlock: a barrier can never fill"),
    ("early_exit", "exited while 16 thread(s) wait at __syncthreads"),
    ("partial_mask", "partial masks"),
    ("divergent_shuffle", "divergent warp exchange"),
    ("partial_warp", "masks naming lanes the block does not have"),
    ("out_of_bounds", "AddressSanitizer: heap-buffer-overflow"),
    ("timeout", "timeout"),
])
def test_emulator_reports_misuse(driver, tmp_path, case, message):
    if case == "out_of_bounds" and "-fsanitize=address" not in " ".join(sanitizer_flags()):
        pytest.skip("AddressSanitizer does not link here")
    done = run(driver, f"T {case}\n", str(tmp_path), env={"FNF_EMU_TIMEOUT": "1"})
    assert done.returncode != 0 and message in done.stderr, done.stdout + done.stderr[-3000:]


def test_half_and_bfloat16_round_like_torch(driver, tmp_path):
    gen = generator("conversions")
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, 2.0 ** -24,
                            2.0 ** -25, 2.0 ** -25 * 1.0001, 3 * 2.0 ** -26, 2.0 ** -14, 1 + 2.0 ** -11,
                            1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 3.3895e38, 1e-40, -1e-45])
    bits = torch.randint(-2 ** 31, 2 ** 31, (200000,), generator=gen, dtype=torch.int64).to(torch.int32)
    values = torch.cat([special, bits.view(torch.float32), torch.randn(50000, generator=gen) * 1e3])
    values = values[~torch.isnan(values)]  # NaN payloads are compared below by class only
    values = torch.cat([values, torch.tensor([float("nan")])])
    path = write_tensor(values, str(tmp_path), "values")
    done = run(driver, f"C {values.numel()} {path} {tmp_path}/conv\n", str(tmp_path))
    assert done.returncode == 0, done.stderr
    half = read_tensor(f"{tmp_path}/conv.half", torch.int16)
    bf16 = read_tensor(f"{tmp_path}/conv.bf16", torch.int16)
    for got, dtype in ((half, torch.float16), (bf16, torch.bfloat16)):
        want = values.to(dtype)
        nan = torch.isnan(want)
        assert torch.isnan(got.view(dtype)[nan]).all()
        mismatch = (got[~nan] != want.view(torch.int16)[~nan]).nonzero()
        assert mismatch.numel() == 0, (dtype, values[~nan][mismatch[:5, 0]])
    patterns = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    for name, dtype in (("half2f", torch.float16), ("bf162f", torch.bfloat16)):
        got = read_tensor(f"{tmp_path}/conv.{name}", torch.float32)
        torch.testing.assert_close(got, patterns.view(dtype).float(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_penalty_kernels_match_float64_reference(driver, tmp_path, dtype):
    gen = generator(f"penalty {dtype}")
    results, _ = run_penalty(driver, penalty_cases(dtype, gen), dtype, str(tmp_path), gen)
    compare_penalty(results, dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_dilation_kernels_match_reference(driver, tmp_path, dtype):
    gen = generator(f"dilation {dtype}")
    run_dilation(driver, dilation_cases(dtype, gen), dtype, str(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grid_striding_paths(driver_small_grid, tmp_path, dtype):
    """With gridDim.y capped at 3, planes (penalty), images and rows (dilation) are strided over."""
    gen = generator(f"striding {dtype}")
    env = {"FNF_EMU_TRACE": "1"}
    results, done = run_penalty(driver_small_grid, striding_penalty_cases(dtype, gen), dtype, str(tmp_path), gen, env)
    compare_penalty(results, dtype)
    grids = re.findall(r"launch \(?(\w+)<.*?grid \((\d+),(\d+),1\)", done.stderr)
    assert grids and all(int(y) <= 3 for _, _, y in grids), done.stderr[-2000:]
    done = run_dilation(driver_small_grid, striding_dilation_cases(dtype, gen), dtype, str(tmp_path), env)
    launches = re.findall(r"launch (\w+)<.*?grid \((\d+),(\d+),1\)", done.stderr)
    assert ("column_kernel", "2", "3") in launches and ("row_kernel", "48", "1") in launches, done.stderr[-2000:]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_group_norm_silu_kernels_match_float64_reference(driver, tmp_path, dtype):
    gen = generator(f"group_norm_silu-{dtype}")
    run_norm(driver, norm_cases(dtype, gen), dtype, str(tmp_path), gen)


def test_group_norm_silu_grid_striding(driver_small_grid, tmp_path):
    """gridDim.y = 3: every (n, c) plane beyond it is taken by a block striding over planes."""
    gen = generator("group_norm_silu-striding")
    run_norm(driver_small_grid, norm_cases(torch.float32, gen)[:3], torch.float32, str(tmp_path), gen)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_rms_norm_silu_kernels_match_float64_reference(driver, tmp_path, dtype):
    gen = generator(f"rms_norm_silu-{dtype}")
    results = run_rms(driver, rms_cases(dtype, gen), dtype, str(tmp_path), gen)
    cols = [int(re.search(r"cols=(\d+)", line).group(1)) for line in results]
    assert cols == [32, 1, 1, 32, 32, 32], "each walk of the kernels is taken"


def test_rms_norm_silu_blocks_stride_over_tiles(driver_small_grid, tmp_path):
    """At most 3 blocks: each takes several tiles and adds them all into its row of the dweight partials."""
    gen = generator("rms_norm_silu-striding")
    results = run_rms(driver_small_grid, rms_cases(torch.float32, gen), torch.float32, str(tmp_path), gen)
    assert all("blocks=3 " in line or "blocks=1 " in line or "blocks=2 " in line for line in results)


def test_empty_inputs_launch_nothing(driver, tmp_path):
    """Empty images and heatmaps: no launch (an empty grid would be an invalid configuration), no error."""
    folder = str(tmp_path)
    gen = generator("empty")
    empty = [("b0", torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4), torch.zeros(0, 1, 4, 4)),
             ("c0", torch.zeros(2, 0, 4, 4), torch.zeros(2, 0, 4, 4), torch.zeros(2, 0, 4, 4)),
             ("h0", torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 4), torch.zeros(2, 1, 0, 4))]
    results, done = run_penalty(driver, empty, torch.float32, folder, gen, {"FNF_EMU_TRACE": "1"})
    assert "launch" not in done.stderr
    for name, sumsq, *_ in results:
        assert sumsq.eq(0).all(), name
    cases = [(f"e{i}", torch.zeros(shape), torch.zeros(shape[0]), 1, False, torch.float32)
             for i, shape in enumerate([(0, 5, 5), (2, 0, 5), (2, 5, 0)])]
    done = run_dilation(driver, cases, torch.float32, folder, {"FNF_EMU_TRACE": "1"})
    assert "launch" not in done.stderr


# ---- planted bugs: each must make the harness fail -------------------------------------------------------------
PLANTED = {
    # j < n -> j <= n in the forward kernel: one element past each plane's end (the tail).
    "off_by_one_tail": ("cuda/penalty.cu", "      if (j < n) {\n        const acc_t d",
                        "      if (j <= n) {\n        const acc_t d"),
    # The barrier between the per-warp sums and their reduction by warp 0.
    "missing_syncthreads": ("cuda/penalty.cu", "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();\n",
                            "  if (lane == 0) warp_sums[warp] = v;\n"),
    # Only the lanes that hold a warp sum take part in the second-level shuffles (with a full mask).
    "partial_warp_shuffle": ("cuda/penalty.cu", "  if (warp == 0) {\n", "  if (warp == 0 && lane < kThreads / 32) {\n"),
    # The partials buffer sized per sample instead of per plane (B * chunks, not B * D0 * chunks).
    "undersized_partials": ("cuda/penalty.cu", "return empty(a) ? 0 : a.batch * a.size[0] * grid_geometry(a).chunks;",
                            "return empty(a) ? 0 : a.batch * grid_geometry(a).chunks;"),
}


def harness_verdict(exe: str, folder: str) -> str:
    """'' when the penalty cases pass in fp32, else the failure (emulator/sanitizer error or mismatch)."""
    gen = generator("planted")
    try:
        results, _ = run_penalty(exe, penalty_cases(torch.float32, gen), torch.float32, folder, gen)
        compare_penalty(results, torch.float32)
    except AssertionError as e:
        return str(e)
    return ""


@pytest.mark.slow  # ~10 s per bug: one rebuild of penalty.cu under the sanitizers
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_makes_the_harness_fail(driver, tmp_path, bug):
    path, old, new = PLANTED[bug]
    csrc = str(tmp_path / "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), csrc, ignore=shutil.ignore_patterns("__pycache__"))
    text = open(os.path.join(csrc, path)).read()
    assert text.count(old) == 1, f"the code the {bug} bug is planted in has changed: update PLANTED"
    with open(os.path.join(csrc, path), "w") as f:
        f.write(text.replace(old, new))
    assert harness_verdict(driver, str(tmp_path)) == "", "the unpatched source must pass"
    verdict = harness_verdict(build(csrc), str(tmp_path))
    print(f"planted {bug}: the harness fails with:\n{verdict[:3000]}")
    assert verdict, f"planted bug {bug} went unnoticed"


# ---- the bindings' argument checks and edge behaviour (the CUDA ones where a GPU is present) -------------------
def _ops_on(device: str):
    from fnf_kernels import _extension

    if _extension.load() is None:
        pytest.skip(f"the compiled extension is not built: {_extension.error()}")
    if device == "cuda" and not (torch.cuda.is_available() and _extension.has_cuda_kernels()):
        pytest.skip("needs a GPU and the extension built with its CUDA kernels")
    return torch.ops.fnf_kernels


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_penalty_backward_checks_grad_and_norms(device):
    """One clear error for a wrong dtype or device of grad/norms on every backend (CUDA read garbage or hit an
    illegal address before)."""
    ops = _ops_on(device)
    image = torch.rand(2, 3, 4, 5, device=device)
    norms = ops.penalty_norms(image, image * 0.5, torch.zeros(2, 1, 4, 5, device=device), False)
    grad = torch.ones(2, device=device)
    with pytest.raises(TypeError, match="norms must be"):
        ops.penalty_backward(grad, image, image * 0.5, torch.zeros(2, 1, 4, 5, device=device), norms.double(), False)
    with pytest.raises(TypeError, match="grad must be floating point"):
        ops.penalty_backward(grad.int(), image, image * 0.5, torch.zeros(2, 1, 4, 5, device=device), norms, False)
    if device == "cuda":
        for g, n in ((grad.cpu(), norms), (grad, norms.cpu())):
            with pytest.raises(ValueError, match="must be on image's device"):
                ops.penalty_backward(g, image, image * 0.5, torch.zeros(2, 1, 4, 5, device=device), n, False)
    out = ops.penalty_backward(grad, image, image * 0.5, torch.zeros(2, 1, 4, 5, device=device), norms, False)
    assert out.shape == image.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_empty_tensors_give_zeros_on_every_backend(device):
    ops = _ops_on(device)
    for shape in ((0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)):
        image = torch.zeros(shape, device=device)
        mask = torch.zeros(shape, device=device)
        norms = ops.penalty_norms(image, image, mask, False)
        assert norms.shape == (shape[0],) and norms.eq(0).all()
        grad = ops.penalty_backward(torch.ones(shape[0], device=device), image, image, mask, norms, True)
        assert grad.shape == shape
    for shape in ((0, 5, 5), (2, 0, 5), (2, 5, 0)):
        out = ops.threshold_dilate(torch.zeros(shape, device=device), torch.zeros(shape[0], device=device), 1, False,
                                   torch.float32)
        assert out.shape == shape


@pytest.mark.slow  # a few seconds on a GPU
def test_cuda_batches_above_grid_limit():
    """70000 images (above gridDim.y's 65535) in one call: the CUDA kernels stride over them."""
    ops = _ops_on("cuda")
    gen = torch.Generator().manual_seed(SEED)
    print(f"seed {SEED}")
    hm = torch.rand(70000, 3, 5, generator=gen).cuda()
    thr = torch.full((70000,), 0.8, device="cuda")
    out = ops.threshold_dilate(hm, thr, 1, True, torch.float32)
    torch.testing.assert_close(out.cpu(), ref.threshold_dilate(hm.cpu(), thr.cpu(), 1, "disk", torch.float32),
                               rtol=0, atol=0)
    image = torch.rand(70000, 1, 3, 3, generator=gen).cuda()
    norms = ops.penalty_norms(image, image * 0, torch.zeros_like(image), True)
    torch.testing.assert_close(norms.double().cpu(), image.double().pow(2).sum((1, 2, 3)).cpu(),
                               rtol=64 * torch.finfo(torch.float32).eps, atol=0)
