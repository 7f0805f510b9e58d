// Box math shared by the CPU and CUDA kernels of csrc/box_ops: one definition, so CI tests the code the GPU runs.
//
// Boxes are (cx, cy, w, h); GIoU works on their corners (x0, y0, x1, y1) = (cx - w/2, cy - h/2, cx + w/2, cy + h/2)
// and mirrors detr_fast/ops/reference.py::_giou_parts operation by operation:
//   inter = max(min(ax1, bx1) - max(ax0, bx0), 0) * max(min(ay1, by1) - max(ay0, by0), 0)
//   union = area_a + area_b - inter,                iou = inter / (union + eps)
//   area_c = enclosing box area (clamped at 0),     giou = iou - (area_c - union) / (area_c + eps)
// eps = kGiouEps = 1e-7 (reference.GIOU_EPS), added to the union and to the enclosing area before dividing, so
// degenerate boxes (zero width or height, both boxes empty, boxes that touch) give finite values and gradients:
// with union = area_c = 0 the GIoU is 0 and every derivative is bounded by about 1 / eps times box sizes.
// NaN in any coordinate makes the box's area NaN, hence NaN GIoU, loss and gradient; nothing traps.
//
// The analytic gradient follows torch's autograd conventions for the same formula, so it equals the reference's
// autograd result even at the kinks: min/max split the gradient in half between tied arguments, clamp(min=0)
// takes the minimum-norm subgradient (the gradient passes only where its argument is > 0, as in torch >= 2.14;
// older torch also passed it at exactly 0), and |x| has derivative sign(x) with sign(0) = 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/hd.h"

namespace detr_fast {
namespace box {

// Same value as GIOU_EPS in detr_fast/ops/reference.py; converted to the compute type (1e-7f in fp32).
constexpr double kGiouEps = 1e-7;

// ---- scalar helpers that propagate NaN (unlike fminf/fmaxf, which drop it) ----
template <typename T>
DF_HD T min_nan(T a, T b) {
  return (a != a || a < b) ? a : b;
}
template <typename T>
DF_HD T max_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}
template <typename T>
DF_HD T clamp0(T x) {
  return x < T(0) ? T(0) : x;  // NaN < 0 is false: NaN passes through
}
template <typename T>
DF_HD T abs_nan(T x) {
  return x < T(0) ? -x : x;
}
template <typename T>
DF_HD T sign0(T x) {  // torch.sgn on reals: -1, 0, +1; NaN stays NaN
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : (x == T(0) ? T(0) : x));
}
// d min(a, b) / da and d max(a, b) / da, with torch's half-half split at ties.
template <typename T>
DF_HD T dmin_da(T a, T b) {
  return a < b ? T(1) : (a == b ? T(0.5) : T(0));
}
template <typename T>
DF_HD T dmax_da(T a, T b) {
  return a > b ? T(1) : (a == b ? T(0.5) : T(0));
}
// d clamp(x, min=0) / dx, minimum-norm subgradient: 0 at x == 0 (e.g. boxes that share an edge, empty boxes).
template <typename T>
DF_HD T dclamp0(T x) {
  return x > T(0) ? T(1) : T(0);
}

template <typename T>
struct Xyxy {
  T x0, y0, x1, y1;
};

// (cx, cy, w, h) -> corners, as reference.box_cxcywh_to_xyxy computes them.
template <typename T>
DF_HD Xyxy<T> to_xyxy(const T* b) {
  return {b[0] - T(0.5) * b[2], b[1] - T(0.5) * b[3], b[0] + T(0.5) * b[2], b[1] + T(0.5) * b[3]};
}

// Sum over the 4 coordinates of |p - t| (the L1 term of the matching cost and of the loss).
template <typename T>
DF_HD T l1(const T* p, const T* t) {
  return abs_nan(p[0] - t[0]) + abs_nan(p[1] - t[1]) + abs_nan(p[2] - t[2]) + abs_nan(p[3] - t[3]);
}

// Generalized IoU of two corner boxes. Symmetric in (a, b), bit for bit.
template <typename T>
DF_HD T giou(const Xyxy<T>& a, const Xyxy<T>& b) {
  const T eps = T(kGiouEps);
  const T area_a = (a.x1 - a.x0) * (a.y1 - a.y0);
  const T area_b = (b.x1 - b.x0) * (b.y1 - b.y0);
  const T iw = clamp0(min_nan(a.x1, b.x1) - max_nan(a.x0, b.x0));
  const T ih = clamp0(min_nan(a.y1, b.y1) - max_nan(a.y0, b.y0));
  const T inter = iw * ih;
  const T uni = area_a + area_b - inter;
  const T iou = inter / (uni + eps);
  const T cw = clamp0(max_nan(a.x1, b.x1) - min_nan(a.x0, b.x0));
  const T ch = clamp0(max_nan(a.y1, b.y1) - min_nan(a.y0, b.y0));
  const T area_c = cw * ch;
  return iou - (area_c - uni) / (area_c + eps);
}

// GIoU of the cxcywh box p against the corner box b, with its gradient w.r.t. p's (cx, cy, w, h).
template <typename T>
struct GiouGrad {
  T giou;
  T d[4];  // dGIoU / d(cx, cy, w, h) of p
};

template <typename T>
DF_HD GiouGrad<T> giou_with_grad(const T* p, const Xyxy<T>& b) {
  const T eps = T(kGiouEps);
  const Xyxy<T> a = to_xyxy(p);
  const T aw = a.x1 - a.x0, ah = a.y1 - a.y0;
  const T area_a = aw * ah;
  const T area_b = (b.x1 - b.x0) * (b.y1 - b.y0);
  const T iw_raw = min_nan(a.x1, b.x1) - max_nan(a.x0, b.x0);
  const T ih_raw = min_nan(a.y1, b.y1) - max_nan(a.y0, b.y0);
  const T iw = clamp0(iw_raw), ih = clamp0(ih_raw);
  const T inter = iw * ih;
  const T uni = area_a + area_b - inter;
  const T u = uni + eps;  // denominator of the IoU
  const T iou = inter / u;
  const T cw_raw = max_nan(a.x1, b.x1) - min_nan(a.x0, b.x0);
  const T ch_raw = max_nan(a.y1, b.y1) - min_nan(a.y0, b.y0);
  const T cw = clamp0(cw_raw), ch = clamp0(ch_raw);
  const T area_c = cw * ch;
  const T c = area_c + eps;  // denominator of the enclosing term

  GiouGrad<T> out;
  out.giou = iou - (area_c - uni) / c;
  // Partial derivatives of giou = inter / u - (area_c - uni) / c, with uni = area_a + area_b - inter:
  const T inv_u = T(1) / u, inv_c = T(1) / c;
  const T iou_u = iou * inv_u;                      // inter / u^2
  const T g_inter = inv_u + iou_u - inv_c;          // d/d inter
  const T g_area_a = inv_c - iou_u;                 // d/d area_a
  const T g_area_c = -(u * inv_c) * inv_c;          // d/d area_c = -u / c^2
  // Through the clamps to the raw widths and heights of the intersection and the enclosing box.
  const T g_iw = g_inter * ih * dclamp0(iw_raw);
  const T g_ih = g_inter * iw * dclamp0(ih_raw);
  const T g_cw = g_area_c * ch * dclamp0(cw_raw);
  const T g_ch = g_area_c * cw * dclamp0(ch_raw);
  // To the corners of a (area_a = (x1 - x0) * (y1 - y0)).
  const T gx0 = -g_area_a * ah - g_iw * dmax_da(a.x0, b.x0) - g_cw * dmin_da(a.x0, b.x0);
  const T gx1 = g_area_a * ah + g_iw * dmin_da(a.x1, b.x1) + g_cw * dmax_da(a.x1, b.x1);
  const T gy0 = -g_area_a * aw - g_ih * dmax_da(a.y0, b.y0) - g_ch * dmin_da(a.y0, b.y0);
  const T gy1 = g_area_a * aw + g_ih * dmin_da(a.y1, b.y1) + g_ch * dmax_da(a.y1, b.y1);
  // x0 = cx - w/2, x1 = cx + w/2 (and the same in y).
  out.d[0] = gx0 + gx1;
  out.d[1] = gy0 + gy1;
  out.d[2] = T(0.5) * (gx1 - gx0);
  out.d[3] = T(0.5) * (gy1 - gy0);
  return out;
}

// ---- matching cost ----

template <typename T>
DF_HD T exp_(T x);
template <>
DF_HD float exp_<float>(float x) {
  return expf(x);
}
template <>
DF_HD double exp_<double>(double x) {
  return exp(x);
}

// What a cost column holds: a real target, padding (t >= num_targets[b]: +inf), or invalid input (NaN): a
// num_targets outside [0, T] or a real target's label outside [0, C). The CPU op raises on invalid input before
// its kernel runs; the CUDA op cannot read device values without a sync, so it writes NaN there, which
// linear_assignment rejects with an error.
enum class Column { kReal, kPadded, kInvalid };

DF_HD Column column_kind(int64_t t, int64_t n, int64_t num_cols, int64_t label, int64_t num_classes) {
  if (n < 0 || n > num_cols) return Column::kInvalid;
  if (t >= n) return Column::kPadded;
  if (label < 0 || label >= num_classes) return Column::kInvalid;
  return Column::kReal;
}

// w_bbox * L1 - w_class * prob - w_giou * GIoU for one (query, target) pair: p and t are cxcywh, prob is the
// query's softmax probability of the target's class. Same order of terms as reference.matching_cost.
template <typename T>
DF_HD T matching_cost_entry(T prob, const T* p, const T* t, T w_class, T w_bbox, T w_giou) {
  const T g = giou(to_xyxy(p), to_xyxy(t));
  return w_bbox * l1(p, t) + w_class * (-prob) + w_giou * (-g);
}

template <typename T>
DF_HD T infinity() {
  return std::numeric_limits<T>::infinity();
}
template <typename T>
DF_HD T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

}  // namespace box
}  // namespace detr_fast
