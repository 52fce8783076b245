// A 2-D matmul for XLA:CPU through oneDNN, reached from JAX with jax.ffi.
//
// out[m, n] (float32) = op(a) [m, k] . op(b) [k, n], row-major, op() an
// optional transpose (a strided view, not a copy). float32 and bfloat16
// operands; oneDNN picks its kernel for the CPU it runs on (AMX tiles,
// AVX512-BF16, AVX-512, AVX2). Primitives are built once per shape and kept;
// each call brings its own scratchpad, so that XLA's threads may run one
// primitive at once (oneDNN allows that only with a user scratchpad, and
// only in a build with concurrent execution; the gomp build's primitives
// are otherwise stateless). Built and timed by benchmarks/matmul_paths.py.

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int64_t, int64_t, int64_t, bool, bool, bool>;

struct Matmul {
  dnnl::memory::desc a, b, c, scratchpad;
  dnnl::matmul primitive;
};

const Matmul& Primitive(int64_t m, int64_t k, int64_t n, bool bf16,
                        bool transpose_a, bool transpose_b) {
  static std::mutex mutex;
  static std::map<Key, Matmul> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const Key key{m, k, n, bf16, transpose_a, transpose_b};
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  const dt in = bf16 ? dt::bf16 : dt::f32;
  dnnl::memory::desc a({m, k}, in, transpose_a ? tag::ba : tag::ab);
  dnnl::memory::desc b({k, n}, in, transpose_b ? tag::ba : tag::ab);
  dnnl::memory::desc c({m, n}, dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc desc(Engine(), a, b, c, attr);
  return cache.emplace(key, Matmul{a, b, c, desc.scratchpad_desc(),
                                   dnnl::matmul(desc)})
      .first->second;
}

ffi::Error Run(ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::Buffer<ffi::F32>> out, bool transpose_a,
               bool transpose_b) {
  const auto a_dims = a.dimensions();
  const auto b_dims = b.dimensions();
  if (a_dims.size() != 2 || b_dims.size() != 2) {
    return ffi::Error::InvalidArgument("onednn_matmul: operands must be 2-D");
  }
  if (a.element_type() != b.element_type() ||
      (a.element_type() != ffi::F32 && a.element_type() != ffi::BF16)) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: two float32 or two bfloat16 operands");
  }
  const int64_t m = transpose_a ? a_dims[1] : a_dims[0];
  const int64_t k = transpose_a ? a_dims[0] : a_dims[1];
  const int64_t n = transpose_b ? b_dims[0] : b_dims[1];
  if ((transpose_b ? b_dims[1] : b_dims[0]) != k) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: contracted sizes differ");
  }
  const auto out_dims = out->dimensions();
  if (out_dims.size() != 2 || out_dims[0] != m || out_dims[1] != n) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: the result must be [m, n]");
  }
  try {
    const Matmul& matmul = Primitive(m, k, n, a.element_type() == ffi::BF16,
                                     transpose_a, transpose_b);
    dnnl::memory a_mem(matmul.a, Engine(), a.untyped_data());
    dnnl::memory b_mem(matmul.b, Engine(), b.untyped_data());
    dnnl::memory c_mem(matmul.c, Engine(), out->typed_data());
    dnnl::memory scratchpad(matmul.scratchpad, Engine());  // this call's own
    dnnl::stream stream(Engine());
    matmul.primitive.execute(stream, {{DNNL_ARG_SRC, a_mem},
                                      {DNNL_ARG_WEIGHTS, b_mem},
                                      {DNNL_ARG_DST, c_mem},
                                      {DNNL_ARG_SCRATCHPAD, scratchpad}});
    stream.wait();
  } catch (const dnnl::error& e) {
    // An exception must not cross the FFI boundary (it would abort).
    return ffi::Error::Internal(e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMatmul, Run,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
