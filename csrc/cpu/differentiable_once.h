// The check the native ops' C++ autograd nodes (set_transformer.cpp, authors_mlp.cpp,
// authors_loss.cpp) make at the start of their backward: they compute their gradients below
// autograd, so a backward that would record a graph (create_graph=True) is refused.
#pragma once

#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

namespace topn_kernels {

inline void check_differentiable_once(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              " is differentiable once: its backward cannot record a graph (create_graph=True)");
}

}  // namespace topn_kernels
