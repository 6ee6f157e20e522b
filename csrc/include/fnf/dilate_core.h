// Scan steps of threshold_dilate, shared by the CPU and CUDA kernels (the Triton kernel follows the
// same scheme). Cost per pixel is independent of the radius:
//
//  column pass  d_L(y, x) = vertical distance from (y, x) to the nearest pixel of its column whose
//               state >= L (L = 1: above threshold or NaN; L = 2: NaN), capped at cap = r + 1.
//               A downward scan carries the last such row, an upward scan the next one.
//  row pass     pixel x' reaches s_L(x') = r (square) or floor(sqrt(r^2 - d_L^2)) (disk) when d_L <= r.
//               x is covered at level L when max_{x' <= x}(x' + s_L) >= x (scan from the left) or
//               min_{x' >= x}(x' - s_L) <= x (scan from the right).
//  output       NaN (1 for bool/uint8) where covered at level 2, else 1 where covered at level 1, else 0.
//
// Distances and reaches are packed two to a uint32: level 1 in the low 16 bits, level 2 in the high.
#pragma once
#include <cmath>
#include "fnf/types.h"

namespace fnf {
namespace dilate {

template <typename acc_t>
FNF_HD int state_of(acc_t v, acc_t thr) {
  return v != v ? 2 : (v > thr ? 1 : 0);
}

FNF_HD uint32_t pack(uint32_t lo, uint32_t hi) { return (lo & 0xffffu) | (hi << 16); }
FNF_HD int lo16(uint32_t v) { return int(v & 0xffffu); }
FNF_HD int hi16(uint32_t v) { return int(v >> 16); }
FNF_HD int imin(int a, int b) { return a < b ? a : b; }
FNF_HD int imax(int a, int b) { return a > b ? a : b; }

// Downward step at row y: update the last rows seen at each level, return the packed distances.
FNF_HD uint32_t column_down(int state, int y, int cap, int& last1, int& last2) {
  last1 = state >= 1 ? y : last1;
  last2 = state == 2 ? y : last2;
  return pack(uint32_t(imin(y - last1, cap)), uint32_t(imin(y - last2, cap)));
}

// Upward step at row y: combine the downward distances with the next rows below.
FNF_HD uint32_t column_up(uint32_t down, int y, int cap, int& next1, int& next2) {
  int d1 = lo16(down), d2 = hi16(down);
  next1 = d1 == 0 ? y : next1;
  next2 = d2 == 0 ? y : next2;
  return pack(uint32_t(imin(imin(d1, next1 - y), cap)), uint32_t(imin(imin(d2, next2 - y), cap)));
}

// Initial carries: far enough that y - last and next - y exceed cap.
FNF_HD int far_before(int cap) { return -cap - 1; }
FNF_HD int far_after(int n, int cap) { return n + cap + 1; }

// Horizontal reach of a column pixel at vertical distance d: -1 when d > r. Branch-free: sqrtf of an
// integer below 2^30 is within 1 of the exact root, so one correction each way gives floor(sqrt(v)).
FNF_HD int reach(int d, int r, bool disk) {
  int s = r;
  if (disk) {
    const int v = imax(r * r - d * d, 0);
    s = int(sqrtf(float(v)));
    s -= int(s * s > v);
    s += int((s + 1) * (s + 1) <= v);
  }
  return d > r ? -1 : s;
}

// Left-to-right step at column x: return (reach1 + 1, left1, reach2 + 1, left2) packed as 15+1 bits each,
// where left_L says some x' <= x covers x at level L.
FNF_HD uint32_t row_left(uint32_t dist, int x, int r, bool disk, int& best1, int& best2) {
  int s1 = reach(lo16(dist), r, disk), s2 = reach(hi16(dist), r, disk);
  best1 = imax(best1, s1 >= 0 ? x + s1 : -1);
  best2 = imax(best2, s2 >= 0 ? x + s2 : -1);
  uint32_t lo = uint32_t(s1 + 1) | (best1 >= x ? 0x8000u : 0u);
  uint32_t hi = uint32_t(s2 + 1) | (best2 >= x ? 0x8000u : 0u);
  return pack(lo, hi);
}

// Right-to-left step at column x: return the final state (0, 1 or 2) of pixel x.
FNF_HD int row_right(uint32_t left, int x, int& best1, int& best2) {
  int lo = lo16(left), hi = hi16(left);
  int s1 = (lo & 0x7fff) - 1, s2 = (hi & 0x7fff) - 1;
  best1 = imin(best1, s1 >= 0 ? x - s1 : best1);
  best2 = imin(best2, s2 >= 0 ? x - s2 : best2);
  bool cover2 = (hi & 0x8000) || best2 <= x;
  bool cover1 = (lo & 0x8000) || best1 <= x;
  return cover2 ? 2 : (cover1 ? 1 : 0);
}

// Initial carries of the row scans.
FNF_HD int row_left_init() { return -1; }
FNF_HD int row_right_init(int width) { return 2 * width + 1; }

}  // namespace dilate
}  // namespace fnf
