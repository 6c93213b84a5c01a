#include <tuple>

#include "../bindings.h"
#include "d2v2/cpu_kernels.h"

namespace {

using namespace d2v2::binding;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// Target types the kernels are instantiated for: pred's own fp64 for fp64 pred (gradcheck), else any
// 16/32-bit float. A target of another type is converted once (it is 1 / clones of pred's size).
at::Tensor target_for(const at::Tensor& target, const at::Tensor& pred) {
  const bool f64 = pred.scalar_type() == at::kDouble;
  if (f64 && target.scalar_type() != at::kDouble) return target.to(at::kDouble);
  if (!f64 && target.scalar_type() == at::kDouble) return target.to(at::kFloat);
  return rows_contiguous(target);
}

// Calls fn(P{}, Tg{}) (null pointers as type tags) for the pred and target types.
template <typename Fn>
void dispatch_pred_target(const at::Tensor& pred, const at::Tensor& target, Fn&& fn) {
  D2V2_DISPATCH_FLOATING(pred.scalar_type(), "masked_regression_loss", [&] {
    using P = scalar_t;
    if constexpr (std::is_same_v<P, double>) {
      fn(static_cast<P*>(nullptr), static_cast<double*>(nullptr));
    } else {
      switch (target.scalar_type()) {
        case at::kFloat:
          return fn(static_cast<P*>(nullptr), static_cast<float*>(nullptr));
        case at::kBFloat16:
          return fn(static_cast<P*>(nullptr), static_cast<d2v2::bf16*>(nullptr));
        case at::kHalf:
          return fn(static_cast<P*>(nullptr), static_cast<d2v2::f16*>(nullptr));
        default:
          TORCH_CHECK_TYPE(false, "masked_regression_loss: unsupported target dtype ", target.scalar_type());
      }
    }
  });
}

void check_inputs(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask, int64_t clones) {
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu() && mask.device().is_cpu(),
              "masked_regression_loss(cpu): CPU tensors only");
  TORCH_CHECK(pred.dim() == 3 && target.dim() == 3 && mask.dim() == 2 && mask.scalar_type() == at::kBool,
              "masked_regression_loss(cpu): expected pred [N, T, C], target [B, T, C], mask [N, T] bool");
  const int64_t N = pred.size(0), T = pred.size(1), C = pred.size(2);
  TORCH_CHECK(clones >= 1 && N == target.size(0) * clones && target.size(1) == T && target.size(2) == C &&
                  mask.size(0) == N && mask.size(1) == T,
              "masked_regression_loss(cpu): shapes do not match");
}

// Returns (loss, grad): loss is 0-dim ("mean", "sum") or [N, T] ("none"), fp32 (fp64 for fp64 pred);
// grad is the [N, T, C] gradient of the loss w.r.t. pred for an incoming gradient of 1 when
// with_grad (mean / sum only), else an empty tensor.
std::tuple<at::Tensor, at::Tensor> masked_regression_loss_forward(const at::Tensor& pred_in,
                                                                  const at::Tensor& target_in,
                                                                  const at::Tensor& mask, int64_t clones,
                                                                  double scale, double beta, int64_t reduction,
                                                                  bool with_grad) {
  check_inputs(pred_in, target_in, mask, clones);
  TORCH_CHECK(!with_grad || reduction != kNone, "masked_regression_loss(cpu): with_grad needs mean or sum");
  const at::Tensor pred = rows_contiguous(pred_in);
  const at::Tensor target = target_for(target_in, pred);
  const int64_t N = pred.size(0), T = pred.size(1), C = pred.size(2);
  const auto acc_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = pred.options().dtype(acc_dtype);
  at::Tensor token_loss = reduction == kNone ? at::empty({N, T}, acc_opts) : at::Tensor();
  at::Tensor row_sum = at::empty({N}, pred.options().dtype(at::kDouble));
  at::Tensor row_count = at::empty({N}, pred.options().dtype(at::kLong));
  at::Tensor grad = with_grad ? at::empty({N, T, C}, pred.options().memory_format(at::MemoryFormat::Contiguous))
                              : at::Tensor();
  double grad_coef = scale;
  if (with_grad && reduction == kMean) {  // the count first: 1 / count is folded into the gradient
    const int64_t count = mask.sum().item<int64_t>();
    grad_coef = count > 0 ? scale / static_cast<double>(count) : 0.0;
  }
  dispatch_pred_target(pred, target, [&](auto* p_tag, auto* t_tag) {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    using Tg = std::remove_pointer_t<decltype(t_tag)>;
    using Acc = typename d2v2::acc_type<P>::type;
    d2v2::cpu::masked_regression_loss_forward<P, Tg>(
        ptr<P>(pred), pred.stride(0), pred.stride(1), ptr<Tg>(target), target.stride(0), target.stride(1),
        ptr<uint8_t>(mask), mask.stride(0), mask.stride(1), N, T, C, clones, scale, beta,
        token_loss.defined() ? ptr<Acc>(token_loss) : nullptr, ptr<double>(row_sum), ptr<int64_t>(row_count),
        grad.defined() ? ptr<P>(grad) : nullptr, grad_coef);
  });
  if (reduction == kNone) return {token_loss, at::empty({0}, pred.options())};
  int64_t count = 0;
  double total = d2v2::cpu::reduce_row_partials(ptr<double>(row_sum), ptr<int64_t>(row_count), N, &count);
  if (reduction == kMean) total = count > 0 ? total / static_cast<double>(count) : 0.0;  // no tokens: 0, not NaN
  return {at::scalar_tensor(total, acc_opts), grad.defined() ? grad : at::empty({0}, pred.options())};
}

// grad_pred for incoming gradient g_out (0-dim for "mean" / "sum", [N, T] for "none").
at::Tensor masked_regression_loss_backward(const at::Tensor& g_in, const at::Tensor& pred_in,
                                           const at::Tensor& target_in, const at::Tensor& mask, int64_t clones,
                                           double scale, double beta, int64_t reduction) {
  check_inputs(pred_in, target_in, mask, clones);
  const at::Tensor pred = rows_contiguous(pred_in);
  const at::Tensor target = target_for(target_in, pred);
  const int64_t N = pred.size(0), T = pred.size(1), C = pred.size(2);
  const auto acc_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = g_in.to(acc_dtype);
  int64_t gs_n = 0, gs_t = 0;
  if (reduction == kNone) {
    TORCH_CHECK(g.dim() == 2 && g.size(0) == N && g.size(1) == T, "masked_regression_loss_backward(cpu): grad [N, T]");
    gs_n = g.stride(0);
    gs_t = g.stride(1);
  } else {
    TORCH_CHECK(g.numel() == 1, "masked_regression_loss_backward(cpu): expected a scalar grad");
  }
  double coef = scale;
  if (reduction == kMean) {
    const int64_t count = mask.sum().item<int64_t>();
    coef = count > 0 ? scale / static_cast<double>(count) : 0.0;
  }
  at::Tensor grad = at::empty({N, T, C}, pred.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  dispatch_pred_target(pred, target, [&](auto* p_tag, auto* t_tag) {
    using P = std::remove_pointer_t<decltype(p_tag)>;
    using Tg = std::remove_pointer_t<decltype(t_tag)>;
    using Acc = typename d2v2::acc_type<P>::type;
    d2v2::cpu::masked_regression_loss_backward<P, Tg>(
        ptr<P>(pred), pred.stride(0), pred.stride(1), ptr<Tg>(target), target.stride(0), target.stride(1),
        ptr<uint8_t>(mask), mask.stride(0), mask.stride(1), ptr<Acc>(g), gs_n, gs_t, coef, N, T, C, clones, beta,
        ptr<P>(grad));
  });
  return grad;
}

}  // namespace

void register_loss(pybind11::module_& m) {
  m.def("masked_regression_loss_forward", &masked_regression_loss_forward,
        "(loss, grad): masked regression loss (reduction 0 none, 1 mean, 2 sum); grad of the loss when with_grad");
  m.def("masked_regression_loss_backward", &masked_regression_loss_backward,
        "grad_pred: the derivative at counted tokens, zeros elsewhere, in one pass");
}
