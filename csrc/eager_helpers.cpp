// Helpers of the eager path (fastbnf/ops/functions.py) for groups of hundreds of tensors, where a
// Python loop over the tensors costs more than the kernels.
//
// fastbnf::views_like: the per-tensor pieces of a flat buffer, shaped like a list of tensors.
// The eager ops hand out one piece per parameter tensor three times a step (the samples, the
// gradients of the means and of the log-variances). ATen's unflatten_dense_tensors makes each
// one with a narrow and a view, two dispatched ops and two tensors, host work that grows with
// the number of tensors (benchmarks/bench_step.py, its tensors-N cases). Here each piece is one
// TensorImpl over the same storage, made without the dispatcher
// (tests/test_cpu_kernel.py::test_views_like_matches_unflatten). The pieces are plain tensors, not
// autograd views of the buffer: the ops call this without gradients, on buffers nobody else sees,
// whose pieces do not overlap.
//
// fastbnf::adjacent_flat: one flat tensor over tensors that lie back to back in one storage, in
// order (the gradients that the backward of a torch.cat over the samples hands back), or None.
// The sample's backward then reads them in place instead of copying them.
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <torch/library.h>

#include <optional>
#include <typeinfo>
#include <vector>

#include "eager_helpers.h"
#include "message.h"

namespace fastbnf {

std::vector<at::Tensor> views_like(const at::Tensor& flat, at::TensorList like) {
  FASTBNF_CHECK_VALUE(flat.dim() == 1 && flat.is_contiguous(),
                      "fastbnf::views_like: flat must be a contiguous 1-dim tensor, got shape ",
                      flat.sizes());
  // The pieces copy the buffer's TensorImpl by hand: wrappers (functorch, subclasses) differ.
  FASTBNF_CHECK_VALUE(typeid(*flat.unsafeGetTensorImpl()) == typeid(c10::TensorImpl),
                      "fastbnf::views_like: flat must be a plain dense tensor");
  std::vector<at::Tensor> pieces;
  pieces.reserve(like.size());
  int64_t offset = flat.storage_offset();
  const int64_t end = offset + flat.numel();
  for (const at::Tensor& t : like) {
    at::Tensor piece = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()),
                                                                flat.key_set(), flat.dtype());
    c10::TensorImpl* impl = piece.unsafeGetTensorImpl();
    impl->set_sizes_contiguous(t.sizes());
    impl->set_storage_offset(offset);
    offset += t.numel();
    pieces.push_back(std::move(piece));
  }
  FASTBNF_CHECK_VALUE(offset == end, "fastbnf::views_like: the tensors hold ",
                      offset - flat.storage_offset(), " elements but flat has ", flat.numel());
  return pieces;
}

std::optional<at::Tensor> adjacent_flat(at::TensorList tensors) {
  if (tensors.empty()) return std::nullopt;
  const at::Tensor& first = tensors[0];
  const c10::StorageImpl* storage = first.storage().unsafeGetStorageImpl();
  const auto size = static_cast<int64_t>(first.element_size());
  const char* end = static_cast<const char*>(first.data_ptr());
  int64_t numel = 0;
  for (const at::Tensor& t : tensors) {
    if (t.storage().unsafeGetStorageImpl() != storage || t.scalar_type() != first.scalar_type() ||
        !t.is_contiguous() || static_cast<const char*>(t.data_ptr()) != end) {
      return std::nullopt;
    }
    end += t.numel() * size;
    numel += t.numel();
  }
  return first.as_strided({numel}, {1});
}

}  // namespace fastbnf

// Declared here, not in ops/library.py: helpers of the eager path, whose pure-PyTorch twins are
// ATen's unflatten_dense_tensors and Python loops in fastbnf/ops/functions.py.
TORCH_LIBRARY_FRAGMENT(fastbnf, m) {
  m.def("views_like(Tensor flat, Tensor[] like) -> Tensor[]", &fastbnf::views_like);
  m.def("adjacent_flat(Tensor[] tensors) -> Tensor?", &fastbnf::adjacent_flat);
}
