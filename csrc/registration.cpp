// Schemas of the native (C++) operators. Implementations register per device (csrc/cpu/*.cpp);
// fake kernels and autograd are registered from Python (topn_kernels/native/*.py).
// topn_kernels::topn_create itself is defined in Python, for every backend; this library
// gives only its CPU kernels. A fragment, so that it and the Python op share the namespace.
#include <torch/library.h>

#include "cpu/output_pool.h"

TORCH_LIBRARY_FRAGMENT(topn_kernels, m) {
  // CPU kernels of the op topn_kernels::topn_create, which topn_kernels/ops/topn_create_op.py
  // defines with its fake kernel and autograd (docs/operators.md, topn_create): plain kernels,
  // called by that op only. n: (B,) int64 set sizes; x (B, n_max, d), mask (B, n_max) bool,
  // index (B, n_max) int64 (-1 on padding), weight (B, n_max). n_fixed >= 0: every set has
  // n_fixed points, and n (then possibly empty) is not read.
  m.def(
      "_topn_create_cpu(Tensor query, Tensor angles, Tensor table, Tensor bias, Tensor n, "
      "Tensor film, SymInt n_max, str score_norm, bool sorted, int n_fixed=-1) "
      "-> (Tensor x, Tensor mask, Tensor index, Tensor weight)");
  // Gradients of query, angles, table, bias, film (None where output_mask is False), given the
  // upstream gradients of x and weight and the index the forward produced.
  m.def(
      "_topn_create_backward_cpu(Tensor grad_x, Tensor grad_weight, Tensor query, "
      "Tensor angles, Tensor table, Tensor bias, Tensor film, Tensor index, str score_norm, "
      "bool[5] output_mask) -> (Tensor? grad_query, Tensor? grad_angles, Tensor? grad_table, "
      "Tensor? grad_bias, Tensor? grad_film)");
  // Sinkhorn divergence of packed ragged batches (csrc/cpu/sinkhorn.cpp): x (P, dim) and
  // y (Q, dim), set b = x[x_offsets[b]:x_offsets[b+1]] against y's; value (B,), and with_grad
  // the gradient of each set's value with respect to its points, (P, dim) and (Q, dim).
  m.def(
      "sinkhorn(Tensor x, Tensor y, Tensor x_offsets, Tensor y_offsets, float[] eps_list, "
      "int p, bool debias, bool with_grad) -> (Tensor value, Tensor grad_x, Tensor grad_y)");
  // Losses of padded batches of small sets (csrc/cpu/set_losses.cpp): x (B, N, D), y (B, M, D),
  // optional int64 lengths (B,); the value of every set (B,) and, with_grad, the gradient of
  // each set's value with respect to its points, (B, N, D) and (B, M, D), 0 on padding.
  m.def(
      "chamfer_sets(Tensor x, Tensor y, Tensor? x_lengths, Tensor? y_lengths, int norm, "
      "bool mean, bool single_directional, bool with_grad) "
      "-> (Tensor value, Tensor grad_x, Tensor grad_y)");
  m.def(
      "repulsion_sets(Tensor x, Tensor? lengths, float min_dist, bool with_grad) "
      "-> (Tensor value, Tensor grad_x)");
  m.def(
      "valency_sets(Tensor x, Tensor? lengths, float neighbor_dist, int max_valency, "
      "bool with_grad) -> (Tensor value, Tensor grad_x)");
  // Matched distance of padded batches of equal-size sets (csrc/cpu/matched_distance.cpp):
  // x (B, N, D), y (B, M, D), lengths (B,) the size of both sets of each pair; per set the mean
  // Euclidean distance under an optimal one-to-one assignment (B,), and, with_grad, its
  // gradient with respect to the points, (B, N, D) and (B, M, D), 0 on padding.
  m.def(
      "matched_sets(Tensor x, Tensor y, Tensor lengths, bool with_grad) "
      "-> (Tensor value, Tensor grad_x, Tensor grad_y)");
  // The point terms of the authors' set VAE loss (csrc/cpu/authors_loss.cpp): for the
  // reconstruction x (B, N, D) of y (B, N, D), sets of sizes lengths (B,), the sums over the
  // sets of the matched distance, twice the repulsion and the valency penalty (0-d each), then,
  // with_grad, their gradients with respect to x ((B, N, D) each).
  m.def(
      "authors_point_terms(Tensor x, Tensor y, Tensor lengths, float min_dist, "
      "float neighbor_dist, int max_valency, bool with_grad) -> Tensor[]");
  // The three sums as one differentiable op (gradients reach x), its autograd in C++.
  m.def(
      "authors_point_terms_autograd(Tensor x, Tensor y, Tensor lengths, float min_dist, "
      "float neighbor_dist, int max_valency) -> (Tensor, Tensor, Tensor)");
  // The loss's KL term of mu and log_var (B, L) and its weighted total with the point terms
  // rec, rep and val (0-d each; csrc/cpu/authors_loss.cpp): (total, kl), 0-d each.
  m.def(
      "authors_kl_total(Tensor mu, Tensor log_var, Tensor rec, Tensor rep, Tensor val, "
      "float kl_weight, float repulsion_weight, float valency_weight) -> Tensor[]");
  // The same as one differentiable op (gradients reach mu, log_var, rec, rep and val).
  m.def(
      "authors_kl_total_autograd(Tensor mu, Tensor log_var, Tensor rec, Tensor rep, Tensor val, "
      "float kl_weight, float repulsion_weight, float valency_weight) -> (Tensor, Tensor)");
  // The per-point loops of the native layers (csrc/cpu/point_rows.h), as ops for their tests:
  // the layer norm over the C channels of x (M, C) -> (out, mean (M, 1), rstd (M, 1)) and its
  // backward -> (grad_x, grad_weight, grad_bias, grad_x's column sums); the batch norm over the
  // M points in training -> (out, save_mean, save_invstd), running statistics updated in place,
  // and its backward -> (grad_x, grad_weight, grad_bias); ReLU's backward on grad (M, F) given
  // the ReLU's output u -> (the masked gradient, its column sums); the column sums of x.
  m.def("point_layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor[]");
  m.def(
      "point_layer_norm_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor rstd, "
      "Tensor weight) -> Tensor[]");
  m.def(
      "point_batch_norm(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, float momentum, float eps) -> Tensor[]");
  m.def(
      "point_batch_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor save_mean, "
      "Tensor save_invstd) -> Tensor[]");
  m.def("point_relu_backward_sum(Tensor grad, Tensor u) -> Tensor[]");
  m.def("point_column_sums(Tensor x) -> Tensor");
  // One transformer encoder layer (post-norm, ReLU, no dropout) on B equal-size sets
  // (csrc/cpu/set_transformer.cpp): x (B, n, C); weights in_proj_weight (3C, C), in_proj_bias,
  // out_proj_weight (C, C), out_proj_bias, norm1 weight and bias, linear1 weight (F, C) and
  // bias, linear2 weight (C, F) and bias, norm2 weight and bias. Returns the output (B, n, C)
  // and the 11 intermediates the backward takes as `saved`; the backward returns the gradients
  // of x and of the 12 weights.
  m.def("set_transformer_layer(Tensor x, Tensor[] weights, int heads, float eps) -> Tensor[]");
  m.def(
      "set_transformer_layer_backward(Tensor grad_out, Tensor x, Tensor[] weights, int heads, "
      "Tensor[] saved) -> Tensor[]");
  // One block of the authors' set VAE (csrc/cpu/set_transformer.cpp):
  // x + BatchNorm(relu(layer(x))), the batch norm over the B n points, its running statistics
  // updated in place in training. Returns the output (B, n, C) and the 14 intermediates the
  // backward takes as `saved`; the backward returns the gradients of x, of the layer's 12
  // weights and of the batch norm's weight and bias.
  m.def(
      "set_block(Tensor x, Tensor[] weights, int heads, float eps, Tensor norm_weight, "
      "Tensor norm_bias, Tensor(a!) running_mean, Tensor(b!) running_var, bool training, "
      "float momentum, float norm_eps) -> Tensor[]");
  m.def(
      "set_block_backward(Tensor grad_out, Tensor x, Tensor[] weights, int heads, "
      "Tensor norm_weight, Tensor running_mean, Tensor running_var, bool training, "
      "float norm_eps, Tensor[] saved) -> Tensor[]");
  // The block as one differentiable op, its autograd in C++ (csrc/cpu/set_transformer.cpp):
  // weights are the layer's 12 and the batch norm's weight and bias; returns the output.
  m.def(
      "set_block_autograd(Tensor x, Tensor[] weights, int heads, float eps, "
      "Tensor(a!) running_mean, Tensor(b!) running_var, bool training, float momentum, "
      "float norm_eps) -> Tensor");
  // The two-map MLP of the authors' set VAE, optionally followed by ReLU and a batch norm over
  // the points (csrc/cpu/authors_mlp.cpp). inputs: x (B, n, Din), y (B, n or 1, K) when
  // modulation is 1 ("+") or 2 ("film"), W1, b1, [W2, b2], [W3, b3], Wf, bf, [the norm's weight
  // and bias]; running: [] or the norm's [running_mean, running_var], updated in training.
  // Returns the output (B, n, Dout) and the 7 intermediates the backward takes as `saved`; the
  // backward returns the gradients of inputs' tensors (x's and y's empty where not asked for).
  m.def(
      "authors_mlp(Tensor[] inputs, int modulation, bool residual_start, bool residual_end, "
      "Tensor(a!)[] running, bool training, float momentum, float norm_eps) -> Tensor[]");
  m.def(
      "authors_mlp_backward(Tensor grad_out, Tensor[] inputs, int modulation, "
      "bool residual_start, bool residual_end, Tensor[] running, bool training, "
      "float norm_eps, Tensor[] saved, bool x_grad, bool y_grad) -> Tensor[]");
  // The MLP as one differentiable op, its autograd in C++; returns the output.
  m.def(
      "authors_mlp_autograd(Tensor[] inputs, int modulation, bool residual_start, "
      "bool residual_end, Tensor(a!)[] running, bool training, float momentum, "
      "float norm_eps) -> Tensor");
  // PNA pooling of the authors' set VAE (csrc/cpu/pna_pooling.cpp): x (B, n, C), n >= 2, and
  // the 3 degree scalers (3,) -> (B, 12 C), ordered (channel, reduction, scaler) with the
  // reductions sum, max, mean and standard deviation; the backward returns the gradient of x.
  m.def("pna_pool(Tensor x, Tensor scales) -> Tensor");
  m.def("pna_pool_backward(Tensor grad_out, Tensor x, Tensor out, Tensor scales) -> Tensor");
  // The pooling as one differentiable op, its autograd in C++ (differentiable once, in x).
  m.def("pna_pool_autograd(Tensor x, Tensor scales) -> Tensor");
  // The encoder's one-hot valency classes of the authors' set VAE (csrc/cpu/valency.cpp): x
  // (B, n, d) sets of equal size -> (B, n, classes) in x's dtype, 1 at clamp(neighbours - 1, 0,
  // classes - 1), the neighbours of a point those closer than neighbor_dist.
  m.def("valency_onehot(Tensor x, float neighbor_dist, int classes) -> Tensor");
  // The Top-n creation of the authors' set VAE after its angle MLP (csrc/cpu/authors_topn.cpp):
  // q (B, a) and the weights angles (R, a), points (R, d), gamma_w (d, 1), gamma_b (d,),
  // beta_w (d, 1), beta_b (d,) -> x (B, n, d), then qn (B, a), denom (B,), probs (B, R),
  // index (B, n) int64 and m (B, n) for the backward, which returns the gradients of q and
  // the 6 weights; the autograd op returns x.
  m.def("authors_topn(Tensor q, Tensor[] weights, int n) -> Tensor[]");
  m.def(
      "authors_topn_backward(Tensor grad_x, Tensor q, Tensor[] weights, int n, "
      "Tensor[] saved) -> Tensor[]");
  m.def("authors_topn_autograd(Tensor q, Tensor[] weights, int n) -> Tensor");
  // The 2-norm of all the elements of the tensors together (csrc/cpu/total_norm.cpp): float32
  // or float64 CPU tensors of one dtype; a 0-d tensor of that dtype.
  m.def("total_norm(Tensor[] tensors) -> Tensor");
  // The pool that keeps large CPU output buffers for reuse (csrc/cpu/output_pool.cpp).
  m.def("cpu_cache_bytes() -> int", &topn_kernels::pool_cached_bytes);
  m.def("cpu_cache_clear() -> ()", &topn_kernels::pool_empty_cache);
  m.def("cpu_cache_set_limit(int bytes) -> int", &topn_kernels::pool_set_limit);
}
