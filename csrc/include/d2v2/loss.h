// masked_regression_loss: the per-element loss term and its derivative, shared by the CPU (g++) and
// CUDA (nvcc) compilers so the CPU tests execute the arithmetic any device port would run.
//
// With d = pred - target:
//   beta == 0 (MSE):        l(d) = d^2                                   l'(d) = 2 d
//   beta  > 0 (smooth-L1):  l(d) = 0.5 d^2 / beta   if |d| < beta         l'(d) = d / beta
//                                  |d| - 0.5 beta   otherwise                    sign(d)
// torch's F.mse_loss / F.smooth_l1_loss definitions (smooth-L1's derivative is continuous at |d| == beta,
// so which side takes the tie does not matter). Branch-free (selects only) so the channel loops vectorise.
// A token's loss is scale * sum_c l(d_c); its gradient coef * l'(d_c) with coef = g * scale (/ count).
#pragma once

#include "d2v2/common.h"

namespace d2v2 {

// The constants of one call, in the accumulator type (fp32; fp64 for fp64 pred): the smooth-L1
// divisions become multiplications by precomputed reciprocals (within 1 ulp of torch's division).
template <typename Acc>
struct RegressionParams {
  Acc beta;           // 0: MSE
  Acc half_beta;      // 0.5 beta
  Acc half_inv_beta;  // 0.5 / beta
  Acc inv_beta;       // 1 / beta
};

template <typename Acc>
D2V2_HD RegressionParams<Acc> make_regression_params(double beta) {
  RegressionParams<Acc> p;
  p.beta = static_cast<Acc>(beta);
  p.half_beta = static_cast<Acc>(0.5 * beta);
  p.half_inv_beta = beta > 0 ? static_cast<Acc>(0.5 / beta) : Acc(0);
  p.inv_beta = beta > 0 ? static_cast<Acc>(1.0 / beta) : Acc(0);
  return p;
}

template <typename Acc>
D2V2_HD Acc mse_term(Acc d) {
  return d * d;
}

template <typename Acc>
D2V2_HD Acc mse_grad(Acc d) {
  return d + d;
}

template <typename Acc>
D2V2_HD Acc smooth_l1_term(Acc d, const RegressionParams<Acc>& p) {
  const Acc a = d < Acc(0) ? -d : d;
  return a < p.beta ? d * d * p.half_inv_beta : a - p.half_beta;
}

template <typename Acc>
D2V2_HD Acc smooth_l1_grad(Acc d, const RegressionParams<Acc>& p) {
  const Acc a = d < Acc(0) ? -d : d;
  const Acc sign = d < Acc(0) ? Acc(-1) : Acc(1);
  return a < p.beta ? d * p.inv_beta : sign;
}

// l(d) and l'(d) with the loss kind a compile-time choice, so each kernel instantiation runs one
// straight-line loop body.
template <bool kSmooth, typename Acc>
D2V2_HD Acc regression_term(Acc d, const RegressionParams<Acc>& p) {
  if constexpr (kSmooth) {
    return smooth_l1_term(d, p);
  } else {
    return mse_term(d);
  }
}

template <bool kSmooth, typename Acc>
D2V2_HD Acc regression_grad(Acc d, const RegressionParams<Acc>& p) {
  if constexpr (kSmooth) {
    return smooth_l1_grad(d, p);
  } else {
    return mse_grad(d);
  }
}

}  // namespace d2v2
