// C++ autograd nodes for the eager sample and KL ops (see eager_nodes.h).
//
// A node keeps the group's means and log-variances by reference (parameters are leaves: no
// cycle) with the sum of their versions, autograd's in-place check done by hand: versions only
// grow, so an unchanged sum means that nothing was modified. Nothing else is kept but the noise's
// (seed, offset) state: the backward regenerates the noise.
//
// The link of the seed-style step (kl_divergence(), then reparameterize()): the KL's node has a
// second output, a token, that the sample takes as its only input. The engine then runs the
// sample's node first; it leaves its gradient in the KL's node, whose backward makes one
// sample_backward call for both, so each parameter receives one gradient from one node.
#include "eager_nodes.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "eager_helpers.h"

namespace fastbnf {
namespace eager {
namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;
// std::shared_ptr<Node> or, in newer PyTorch, c10::intrusive_ptr<Node>.
using NodePtr = decltype(torch::autograd::Edge::function);

template <class T>
NodePtr make_node(torch::autograd::edge_list&& next_edges) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<Node>>) {
    return std::shared_ptr<T>(new T(std::move(next_edges)));
  } else {
    return c10::make_intrusive<T>(std::move(next_edges));
  }
}

// The kernel ops, by name: the extension registers their CPU and CUDA implementations and the
// schemas come from fastbnf/ops/library.py, declared before the extension loads.
using OptVars = std::optional<at::ArrayRef<double>>;
using OptTensors = std::optional<at::TensorList>;

c10::OperatorHandle kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

OptVars vars_of(const Prior& prior) { return prior.vars ? OptVars(*prior.vars) : std::nullopt; }

OptTensors means_of(const Prior& prior) {
  return prior.means ? OptTensors(*prior.means) : std::nullopt;
}

// The calls below skip the autograd keys: the kernel ops have no autograd of their own.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_kernel(
    at::TensorList means, at::TensorList logvars, std::optional<at::ScalarType> out_dtype,
    bool with_kl, const Prior& prior, int64_t salt) {
  static const auto op =
      kernel("fastbnf::sample_kernel")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              at::TensorList, at::TensorList, std::optional<int64_t>,
              std::optional<at::ScalarType>, bool, double, OptVars, OptTensors, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(means, logvars, std::nullopt, out_dtype, with_kl, prior.var, vars_of(prior),
                 means_of(prior), salt);
}

std::tuple<at::Tensor, at::Tensor> sample_backward_kernel(
    const at::Tensor& grad_theta, const at::Tensor& grad_kl, at::TensorList means,
    at::TensorList logvars, const at::Tensor& rng_state, bool with_kl, const Prior& prior) {
  static const auto op =
      kernel("fastbnf::sample_backward_kernel")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList,
              const at::Tensor&, bool, double, OptVars, OptTensors)>();
  RECORD_FUNCTION("fastbnf::sample_backward", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_theta, grad_kl, means, logvars, rng_state, with_kl, prior.var,
                 vars_of(prior), means_of(prior));
}

at::Tensor kl_kernel(at::TensorList means, at::TensorList logvars, const Prior& prior) {
  static const auto op =
      kernel("fastbnf::kl_kernel")
          .typed<at::Tensor(at::TensorList, at::TensorList, double, OptVars, OptTensors)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(means, logvars, prior.var, vars_of(prior), means_of(prior));
}

std::tuple<at::Tensor, at::Tensor> kl_backward_kernel(const at::Tensor& grad_kl,
                                                      at::TensorList means, at::TensorList logvars,
                                                      const Prior& prior) {
  static const auto op =
      kernel("fastbnf::kl_backward_kernel")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, at::TensorList, at::TensorList, double, OptVars, OptTensors)>();
  RECORD_FUNCTION("fastbnf::kl_backward", std::vector<c10::IValue>());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad_kl, means, logvars, prior.var, vars_of(prior), means_of(prior));
}

// The group's means and log-variances, kept for the backward.
struct Kept {
  std::vector<at::Tensor> means, logvars;
  int64_t version = 0;

  Kept(const std::vector<at::Tensor>& means_, const std::vector<at::Tensor>& logvars_)
      : means(means_), logvars(logvars_), version(current()) {}

  int64_t current() const {
    int64_t sum = 0;
    for (const auto& t : means) sum += static_cast<int64_t>(t._version());
    for (const auto& t : logvars) sum += static_cast<int64_t>(t._version());
    return sum;
  }

  void check(const char* op, int64_t now) const {
    TORCH_CHECK(now == version,
                "one of the variables needed for gradient computation has been modified by an "
                "inplace operation: a mean or log-variance read by fastbnf::",
                op,
                " changed between its forward and its backward (an optimizer step in between?).");
  }

  // Gradients of the means then of the log-variances, as the node's next edges are ordered.
  variable_list split(const at::Tensor& grad_mu, const at::Tensor& grad_logvar) const {
    variable_list out = views_like(grad_mu, means);
    std::vector<at::Tensor> second = views_like(grad_logvar, logvars);
    out.insert(out.end(), std::make_move_iterator(second.begin()),
               std::make_move_iterator(second.end()));
    return out;
  }
};

// The engine runs a backward with gradients enabled only for create_graph=True.
void refuse_second_order(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "fastbnf::", op,
              " has no second derivatives: a backward with create_graph=True (a gradient "
              "penalty, a Hessian-vector product) through the samples or the KL is not "
              "supported.");
}

// What a linked sample's backward leaves for the KL's.
struct Stash {
  at::Tensor grad_theta, rng_state;
  int64_t version = 0;
};

struct KLBackward : Node {
  using Node::Node;

  std::optional<Kept> kept;
  Prior prior;
  std::optional<Stash> stash;

  std::string name() const override { return "fastbnf::KLBackward"; }

  variable_list apply(variable_list&& grads) override {
    refuse_second_order("kl");
    at::Tensor grad_kl = grads[0];
    std::optional<Stash> taken = std::exchange(stash, std::nullopt);

    if (taken) {
      // The sample's backward checked the tensors' versions; the KL's own are checked only
      // when its gradient is needed.
      const bool with_kl = grad_kl.defined();
      if (with_kl) {
        kept->check("kl", taken->version);
      } else {
        grad_kl = at::zeros({}, kept->means[0].options());
      }
      auto [grad_mu, grad_logvar] =
          sample_backward_kernel(taken->grad_theta, grad_kl, kept->means, kept->logvars,
                                 taken->rng_state, with_kl, prior);
      return kept->split(grad_mu, grad_logvar);
    }

    if (!grad_kl.defined()) return variable_list(num_outputs());
    kept->check("kl", kept->current());
    auto [grad_mu, grad_logvar] = kl_backward_kernel(grad_kl, kept->means, kept->logvars, prior);
    return kept->split(grad_mu, grad_logvar);
  }
};

struct SampleBackward : Node {
  using Node::Node;

  std::optional<Kept> kept;
  Prior prior;
  bool with_kl = false;
  at::Tensor rng_state;
  std::vector<int64_t> numels;  // of the pieces (or of theta), whose gradients may be undefined
  at::TensorOptions options;    // of the pieces
  NodePtr link;                 // the KL's node, for a linked sample
  KLBackward* linked = nullptr;

  std::string name() const override { return "fastbnf::SampleBackward"; }

  // The flat gradient of the samples: read in place where the pieces' gradients lie back to
  // back (the backward of a torch.cat over the samples), else gathered; zeros for unused pieces.
  at::Tensor flat_grad(const variable_list& grads) const {
    const at::TensorList pieces(grads.data(), numels.size());
    const bool all_defined =
        std::all_of(pieces.begin(), pieces.end(), [](const at::Tensor& g) { return g.defined(); });
    if (all_defined) {
      if (auto flat = adjacent_flat(pieces)) return *flat;
    }
    std::vector<at::Tensor> flat;
    flat.reserve(pieces.size());
    for (size_t i = 0; i < pieces.size(); ++i) {
      flat.push_back(pieces[i].defined() ? pieces[i].reshape(-1)
                                         : at::zeros({numels[i]}, options));
    }
    return at::cat(flat);
  }

  variable_list apply(variable_list&& grads) override {
    refuse_second_order("sample");
    const int64_t version = kept->current();
    kept->check("sample", version);
    const at::Tensor grad_theta = flat_grad(grads);

    if (linked != nullptr) {
      linked->stash = Stash{grad_theta, rng_state, version};
      return {at::empty({0}, kept->means[0].options())};  // the token's: empty, no launch
    }

    at::Tensor grad_kl = grads[numels.size()];
    if (!grad_kl.defined()) grad_kl = at::zeros({}, kept->means[0].options());
    auto [grad_mu, grad_logvar] = sample_backward_kernel(grad_theta, grad_kl, kept->means,
                                                         kept->logvars, rng_state, with_kl, prior);
    return kept->split(grad_mu, grad_logvar);
  }

  void release_variables() override {
    // The state stays for a second backward of the KL output alone (retain_graph aside), as
    // the pure-PyTorch path allows; nothing here is large.
  }
};

}  // namespace

std::vector<at::Tensor> kl(const std::vector<at::Tensor>& means,
                           const std::vector<at::Tensor>& logvars, Prior prior, bool linked) {
  RECORD_FUNCTION("fastbnf::kl", std::vector<c10::IValue>());
  at::Tensor divergence = kl_kernel(means, logvars, prior);

  // The token holds nothing (no allocation, no fill launched on a GPU): only its node matters.
  if (!torch::autograd::compute_requires_grad(at::TensorList(means), at::TensorList(logvars))) {
    if (linked) return {divergence, at::empty({0}, divergence.options())};
    return {divergence};
  }

  NodePtr node = make_node<KLBackward>(
      torch::autograd::collect_next_edges(at::TensorList(means), at::TensorList(logvars)));
  auto* kl_node = static_cast<KLBackward*>(node.get());
  kl_node->kept.emplace(means, logvars);
  kl_node->prior = std::move(prior);

  torch::autograd::set_history(divergence, node);
  if (!linked) return {divergence};
  at::Tensor token = at::empty({0}, divergence.options());
  torch::autograd::set_history(token, node);
  return {divergence, token};
}

std::vector<at::Tensor> sample(const std::vector<at::Tensor>& means,
                               const std::vector<at::Tensor>& logvars,
                               std::optional<at::ScalarType> out_dtype, bool with_kl, Prior prior,
                               int64_t salt, bool split, const std::optional<at::Tensor>& token) {
  RECORD_FUNCTION("fastbnf::sample", std::vector<c10::IValue>());
  auto [theta, divergence, rng_state] =
      sample_kernel(means, logvars, out_dtype, with_kl, prior, salt);
  std::vector<at::Tensor> out = split ? views_like(theta, means) : std::vector<at::Tensor>{theta};

  const bool requires_grad = token ? at::GradMode::is_enabled() && token->requires_grad()
                                   : torch::autograd::compute_requires_grad(
                                         at::TensorList(means), at::TensorList(logvars));
  if (requires_grad) {
    NodePtr node =
        make_node<SampleBackward>(token ? torch::autograd::collect_next_edges(*token)
                                        : torch::autograd::collect_next_edges(
                                              at::TensorList(means), at::TensorList(logvars)));
    auto* sample_node = static_cast<SampleBackward*>(node.get());
    if (token) {
      sample_node->link = token->grad_fn();
      sample_node->linked = dynamic_cast<KLBackward*>(sample_node->link.get());
      TORCH_CHECK(sample_node->linked != nullptr,
                  "fastbnf: a sample's token must come from a linked fastbnf KL");
    }
    sample_node->kept.emplace(means, logvars);
    sample_node->prior = std::move(prior);
    sample_node->with_kl = with_kl;
    sample_node->rng_state = rng_state;
    sample_node->options = theta.options();
    for (const auto& piece : out) sample_node->numels.push_back(piece.numel());

    for (const auto& piece : out) torch::autograd::set_history(piece, node);
    torch::autograd::set_history(divergence, node);
  }

  out.push_back(divergence);
  out.push_back(rng_state);
  return out;
}

}  // namespace eager
}  // namespace fastbnf
