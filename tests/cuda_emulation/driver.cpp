// Host driver of the CUDA emulation harness: runs the launchers of csrc/cuda/*.cu (compiled as C++ with
// fnf_cuda_emu.h) on tensors that tests/test_cuda_emulation.py writes as raw storage files, and writes the
// results back. Every tensor is its own heap allocation of exactly its storage size, so AddressSanitizer
// reports any access outside it. One command per line of the script (argv[1]):
//   P dtype name  image ref mask (4-D specs)  coef_path  grad_numel grad_offset gs0 gs1 gs2 gs3
//   D in_dtype out_dtype name  heatmap (3-D spec)  threshold_path radius disk
//   C n in_path name        float32 -> half / bfloat16 bits, and all 65536 bit patterns -> float32
//   G dtype name  x (3-D spec: N C S)  groups eps silu  weight_path|-  bias_path|-  grad (3-D spec)
//     out_numel os0 os1 os2  dx_numel ds0 ds1 ds2      group_norm_silu forward and backward
//   R dtype name  x (3-D spec: O D I)  eps silu  weight_path|-  grad (3-D spec)
//     out_numel os0 os1 os2  dx_numel ds0 ds1 ds2  need_x need_weight    rms_norm_silu forward and backward
//   T test_name             an emulator self-test (selftest_kernels.cpp)
// A 4-D spec is: path numel offset n0 n1 n2 n3 s0 s1 s2 s3; a 3-D spec: path numel offset n0 n1 n2 s0 s1 s2.
// Outputs: name.partials, name.grad (penalty), name.out (dilation), name.half/.bf16/.half2f/.bf162f,
// name.out / .mean / .rstd / .sdyx / .sdy / .dx (group_norm_silu; statistics in the accumulate dtype), name.out /
// .rstd / .dx / .part (rms_norm_silu: rstd (O * I) and the dweight partials (blocks x D) in the accumulate dtype).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "fnf/cuda_launchers.h"
#include "fnf/penalty_args.h"

int run_selftest(const std::string& name);  // selftest_kernels.cpp

namespace {

using fnf::DType;

size_t element_size(DType t) {
  switch (t) {
    case DType::F16: case DType::BF16: return 2;
    case DType::F32: return 4;
    case DType::F64: return 8;
    case DType::Bool: case DType::U8: return 1;
  }
  return 0;
}

size_t acc_size(DType t) { return t == DType::F64 ? 8 : 4; }

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "driver: %s\n", why.c_str());
  std::exit(2);
}

// A heap buffer of exactly `bytes` bytes (at least 1 so that the pointer is valid), owned by the driver.
struct Buffer {
  char* data = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n, int fill) : data(static_cast<char*>(std::malloc(n ? n : 1))), bytes(n) {
    if (!data) die("out of memory");
    std::memset(data, fill, n ? n : 1);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(data); }
};

void read_file(const std::string& path, Buffer& b) {
  std::ifstream f(path, std::ios::binary);
  if (!f) die("cannot open " + path);
  f.read(b.data, std::streamsize(b.bytes));
  if (size_t(f.gcount()) != b.bytes) die("short file " + path);
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), std::streamsize(bytes));
  if (!f) die("cannot write " + path);
}

struct Spec {
  std::string path;
  int64_t numel = 0, offset = 0;
  fnf::Dims4 dims{};
};

Spec read_spec(std::istringstream& in, int rank) {
  Spec s;
  in >> s.path >> s.numel >> s.offset;
  for (int i = 0; i < 4; ++i) s.dims.size[i] = 1, s.dims.stride[i] = 0;
  for (int i = 0; i < rank; ++i) in >> s.dims.size[i];
  for (int i = 0; i < rank; ++i) in >> s.dims.stride[i];
  if (!in) die("bad tensor spec");
  return s;
}

DType read_dtype(std::istringstream& in) {
  int t = -1;
  in >> t;
  if (t < 0 || t > 5) die("bad dtype");
  return DType(t);
}

void penalty(std::istringstream& in) {
  const DType dt = read_dtype(in);
  std::string name;
  in >> name;
  const Spec si = read_spec(in, 4), sr = read_spec(in, 4), sm = read_spec(in, 4);
  std::string coef_path;
  int64_t grad_numel = 0, grad_offset = 0;
  fnf::Dims4 gd = si.dims;
  in >> coef_path >> grad_numel >> grad_offset >> gd.stride[0] >> gd.stride[1] >> gd.stride[2] >> gd.stride[3];
  if (!in) die("bad P line");
  const size_t es = element_size(dt), as = acc_size(dt);
  Buffer img(size_t(si.numel) * es, 0), ref(size_t(sr.numel) * es, 0), msk(size_t(sm.numel) * es, 0);
  read_file(si.path, img);
  read_file(sr.path, ref);
  read_file(sm.path, msk);
  const fnf::PenaltyArgs a = fnf::make_penalty_args(dt, img.data + si.offset * es, si.dims, ref.data + sr.offset * es,
                                                    sr.dims, msk.data + sm.offset * es, sm.dims);
  const int64_t count = fnf::cuda::penalty_partials_count(a);
  Buffer partials(size_t(count) * as, 0xff);  // unwritten partials read as NaN
  const cudaError_t e1 = fnf::cuda::penalty_partials(a, partials.data, nullptr);
  write_file(name + ".partials", partials.data, partials.bytes);

  const int64_t batch = si.dims.size[0];
  Buffer coef(size_t(batch) * as, 0);
  read_file(coef_path, coef);
  Buffer grad(size_t(grad_numel) * es, 0xff);
  const fnf::View4 gv = fnf::make_view(gd, fnf::penalty_dim_order(si.dims));
  bool grad_dense = true;  // as bindings_cuda.cpp: out.strides() == image.strides()
  for (int i = 0; i < 4; ++i) grad_dense = grad_dense && gd.stride[i] == si.dims.stride[i];
  const cudaError_t e2 = fnf::cuda::penalty_backward(a, gv, grad_dense, coef.data, grad.data + grad_offset * es, nullptr);
  write_file(name + ".grad", grad.data, grad.bytes);
  std::printf("P %s partials=%lld dense=%d err=%d,%d\n", name.c_str(), (long long)count, int(a.dense_planes), int(e1),
              int(e2));
}

void dilate(std::istringstream& in) {
  const DType in_dt = read_dtype(in), out_dt = read_dtype(in);
  std::string name, thr_path;
  in >> name;
  const Spec sh = read_spec(in, 3);
  int radius = 0, disk = 0;
  in >> thr_path >> radius >> disk;
  if (!in) die("bad D line");
  const int64_t B = sh.dims.size[0], H = sh.dims.size[1], W = sh.dims.size[2];
  Buffer hm(size_t(sh.numel) * element_size(in_dt), 0);
  read_file(sh.path, hm);
  Buffer thr(size_t(B) * acc_size(in_dt), 0);
  read_file(thr_path, thr);
  Buffer out(size_t(B * H * W) * element_size(out_dt), 0xff);
  Buffer scratch(size_t(B * H * W) * 4, 0xab);
  fnf::DilateArgs a;
  a.heatmap = hm.data + sh.offset * int64_t(element_size(in_dt));
  a.in_dtype = in_dt;
  a.batch = B;
  a.height = H;
  a.width = W;
  for (int i = 0; i < 3; ++i) a.stride[i] = sh.dims.stride[i];
  a.threshold = thr.data;
  a.radius = radius;
  a.disk = disk != 0;
  a.out = out.data;
  a.out_dtype = out_dt;
  a.scratch = reinterpret_cast<uint32_t*>(scratch.data);
  const cudaError_t e = fnf::cuda::threshold_dilate(a, nullptr);
  write_file(name + ".out", out.data, out.bytes);
  std::printf("D %s err=%d\n", name.c_str(), int(e));
}

void group_norm(std::istringstream& in) {
  const DType dt = read_dtype(in);
  std::string name, wpath, bpath;
  in >> name;
  const Spec sx = read_spec(in, 3);
  int64_t groups = 0;
  double eps = 0;
  int silu = 0;
  in >> groups >> eps >> silu >> wpath >> bpath;
  const Spec sg = read_spec(in, 3);
  int64_t out_numel = 0, dx_numel = 0;
  fnf::Strides3 os{}, ds{}, gs{};
  in >> out_numel >> os.s[0] >> os.s[1] >> os.s[2] >> dx_numel >> ds.s[0] >> ds.s[1] >> ds.s[2];
  if (!in) die("bad G line");
  const size_t es = element_size(dt), as = acc_size(dt);
  const int64_t N = sx.dims.size[0], C = sx.dims.size[1], S = sx.dims.size[2];
  Buffer x(size_t(sx.numel) * es, 0), grad(size_t(sg.numel) * es, 0);
  read_file(sx.path, x);
  read_file(sg.path, grad);
  Buffer w(wpath == "-" ? 0 : size_t(C) * as, 0), b(bpath == "-" ? 0 : size_t(C) * as, 0);
  if (wpath != "-") read_file(wpath, w);
  if (bpath != "-") read_file(bpath, b);
  fnf::NormSiluArgs a;
  a.x = x.data + sx.offset * int64_t(es);
  a.dtype = dt;
  a.batch = N;
  a.channels = C;
  a.spatial = S;
  a.groups = groups;
  for (int i = 0; i < 3; ++i) a.stride[i] = sx.dims.stride[i], gs.s[i] = sg.dims.stride[i];
  a.weight = wpath == "-" ? nullptr : w.data;
  a.bias = bpath == "-" ? nullptr : b.data;
  a.eps = eps;
  a.silu = silu != 0;
  const int64_t k = fnf::norm_chunks(a);
  const size_t parts = size_t(N * C * k) * as, stats = size_t(N * groups) * as;
  Buffer pm(parts, 0xff), pv(parts, 0xff), mean(stats, 0xff), rstd(stats, 0xff), out(size_t(out_numel) * es, 0xff);
  const cudaError_t e1 = fnf::cuda::group_norm_silu_forward(a, pm.data, pv.data, mean.data, rstd.data, out.data, os,
                                                            nullptr);
  Buffer p1(parts, 0xff), p2(parts, 0xff), sdyx(size_t(N * C) * as, 0xff), sdy(size_t(N * C) * as, 0xff);
  Buffer coef(size_t(2 * N * groups) * as, 0xff), dx(size_t(dx_numel) * es, 0xff);
  const cudaError_t e2 = fnf::cuda::group_norm_silu_backward(a, grad.data + sg.offset * int64_t(es), gs, mean.data,
                                                             rstd.data, p1.data, p2.data, sdyx.data, sdy.data,
                                                             coef.data, dx.data, ds, nullptr);
  write_file(name + ".out", out.data, out.bytes);
  write_file(name + ".mean", mean.data, mean.bytes);
  write_file(name + ".rstd", rstd.data, rstd.bytes);
  write_file(name + ".sdyx", sdyx.data, sdyx.bytes);
  write_file(name + ".sdy", sdy.data, sdy.bytes);
  write_file(name + ".dx", dx.data, dx.bytes);
  std::printf("G %s chunks=%lld err=%d,%d\n", name.c_str(), (long long)k, int(e1), int(e2));
}

void rms_norm(std::istringstream& in) {
  const DType dt = read_dtype(in);
  std::string name, wpath;
  in >> name;
  const Spec sx = read_spec(in, 3);
  double eps = 0;
  int silu = 0, need_x = 0, need_w = 0;
  in >> eps >> silu >> wpath;
  const Spec sg = read_spec(in, 3);
  int64_t out_numel = 0, dx_numel = 0;
  fnf::Strides3 os{}, ds{}, gs{};
  in >> out_numel >> os.s[0] >> os.s[1] >> os.s[2] >> dx_numel >> ds.s[0] >> ds.s[1] >> ds.s[2] >> need_x >> need_w;
  if (!in) die("bad R line");
  const size_t es = element_size(dt), as = acc_size(dt);
  const int64_t O = sx.dims.size[0], D = sx.dims.size[1], I = sx.dims.size[2];
  Buffer x(size_t(sx.numel) * es, 0), grad(size_t(sg.numel) * es, 0);
  read_file(sx.path, x);
  read_file(sg.path, grad);
  Buffer w(wpath == "-" ? 0 : size_t(D) * as, 0);
  if (wpath != "-") read_file(wpath, w);
  fnf::RmsNormArgs a;
  a.x = x.data + sx.offset * int64_t(es);
  a.dtype = dt;
  a.outer = O;
  a.dim = D;
  a.inner = I;
  for (int i = 0; i < 3; ++i) a.stride[i] = sx.dims.stride[i], gs.s[i] = sg.dims.stride[i];
  a.weight = wpath == "-" ? nullptr : w.data;
  a.eps = eps;
  a.silu = silu != 0;
  Buffer out(size_t(out_numel) * es, 0xff), rstd(size_t(O * I) * as, 0xff);
  const cudaError_t e1 = fnf::cuda::rms_norm_silu_forward(a, out.data, os, rstd.data, nullptr);
  const int64_t blocks = fnf::rms_blocks(a);
  Buffer dx(need_x ? size_t(dx_numel) * es : 0, 0xff), part(need_w ? size_t(blocks * D) * as : 0, 0);
  const cudaError_t e2 = fnf::cuda::rms_norm_silu_backward(a, grad.data + sg.offset * int64_t(es), gs, rstd.data,
                                                           need_x ? dx.data : nullptr, ds,
                                                           need_w ? part.data : nullptr, nullptr);
  write_file(name + ".out", out.data, out.bytes);
  write_file(name + ".rstd", rstd.data, rstd.bytes);
  write_file(name + ".dx", dx.data, dx.bytes);
  write_file(name + ".part", part.data, part.bytes);
  std::printf("R %s blocks=%lld cols=%d err=%d,%d\n", name.c_str(), (long long)blocks, fnf::rms_cols(a), int(e1),
              int(e2));
}

void conversions(std::istringstream& in) {
  int64_t n = 0;
  std::string path, name;
  in >> n >> path >> name;
  Buffer src(size_t(n) * 4, 0);
  read_file(path, src);
  std::vector<uint16_t> h(static_cast<size_t>(n)), b(static_cast<size_t>(n));
  std::vector<float> h2f(65536), b2f(65536);
  for (int64_t i = 0; i < n; ++i) {
    float f;
    std::memcpy(&f, src.data + i * 4, 4);
    h[size_t(i)] = __float2half_rn(f).__x;
    b[size_t(i)] = __float2bfloat16_rn(f).__x;
  }
  for (uint32_t v = 0; v < 65536; ++v) {
    __half hv;
    hv.__x = uint16_t(v);
    __nv_bfloat16 bv;
    bv.__x = uint16_t(v);
    h2f[v] = __half2float(hv);
    b2f[v] = __bfloat162float(bv);
  }
  write_file(name + ".half", h.data(), h.size() * 2);
  write_file(name + ".bf16", b.data(), b.size() * 2);
  write_file(name + ".half2f", h2f.data(), h2f.size() * 4);
  write_file(name + ".bf162f", b2f.data(), b2f.size() * 4);
  std::printf("C %s\n", name.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: driver SCRIPT");
  std::ifstream script(argv[1]);
  if (!script) die(std::string("cannot open ") + argv[1]);
  std::string line;
  while (std::getline(script, line)) {
    std::istringstream in(line);
    std::string cmd;
    if (!(in >> cmd)) continue;
    if (cmd == "P") penalty(in);
    else if (cmd == "D") dilate(in);
    else if (cmd == "C") conversions(in);
    else if (cmd == "G") group_norm(in);
    else if (cmd == "R") rms_norm(in);
    else if (cmd == "T") {
      std::string name;
      in >> name;
      const int rc = run_selftest(name);
      std::printf("T %s rc=%d\n", name.c_str(), rc);
    } else die("unknown command " + cmd);
    std::fflush(stdout);
  }
  std::printf("driver: done\n");
  return 0;
}
