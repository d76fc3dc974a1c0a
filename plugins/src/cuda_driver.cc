// Kernel launches through the CUDA driver API, resolved with dlopen("libcuda.so.1") on first use.
#include "cuda_driver.h"

#include <dlfcn.h>

#include <map>
#include <mutex>

#include "enqueue.h"

extern "C" const unsigned char kvc_fatbin_start[];
extern "C" const unsigned char kvc_fatbin_end[];

namespace kvc_trt {

namespace {

// The few driver types and entry points used (values as in cuda.h; the ABI is stable).
using CUresult = int;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;
using CUstream = void*;
constexpr int kFuncAttrMaxDynamicSharedBytes = 8;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

struct Driver {
  CUresult (*cuInit)(unsigned) = nullptr;
  CUresult (*cuCtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*cuModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*cuFuncSetAttribute)(CUfunction, int, int) = nullptr;
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**) = nullptr;
  CUresult (*cuMemsetD32Async)(unsigned long long, unsigned, size_t, CUstream) = nullptr;
  CUresult (*cuGetErrorString)(CUresult, const char**) = nullptr;
  std::string error;
};

template <typename F>
bool resolve(void* lib, const char* name, F* out, std::string* error) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  if (!*out) *error = std::string("libcuda.so.1 has no ") + name;
  return *out != nullptr;
}

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      d.error = "the CUDA driver library libcuda.so.1 could not be opened (is an NVIDIA driver installed?)";
      return;
    }
    std::string e;
    if (!resolve(lib, "cuInit", &d.cuInit, &e) || !resolve(lib, "cuCtxGetCurrent", &d.cuCtxGetCurrent, &e) ||
        !resolve(lib, "cuModuleLoadData", &d.cuModuleLoadData, &e) ||
        !resolve(lib, "cuModuleGetFunction", &d.cuModuleGetFunction, &e) ||
        !resolve(lib, "cuFuncSetAttribute", &d.cuFuncSetAttribute, &e) ||
        !resolve(lib, "cuLaunchKernel", &d.cuLaunchKernel, &e) ||
        !resolve(lib, "cuMemsetD32Async", &d.cuMemsetD32Async, &e) ||
        !resolve(lib, "cuGetErrorString", &d.cuGetErrorString, &e)) {
      d.error = e;
      return;
    }
    if (d.cuInit(0) != 0) d.error = "cuInit failed";
  });
  return d;
}

struct Kernels {
  CUfunction update = nullptr, attend = nullptr;
};

std::string describe(const Driver& d, CUresult r, const char* what) {
  const char* text = nullptr;
  d.cuGetErrorString(r, &text);
  return std::string("KVAttention: ") + what + ": " + (text ? text : "CUDA error " + std::to_string(r));
}

}  // namespace

const unsigned char* fatbin_data(size_t* size) {
  *size = size_t(kvc_fatbin_end - kvc_fatbin_start);
  return kvc_fatbin_start;
}

bool launch_on_gpu(const kvc_dev::Params& params, void* stream, std::string* error) {
  const Driver& d = driver();
  if (!d.error.empty()) {
    *error = "KVAttention: " + d.error;
    return false;
  }
  CUcontext context = nullptr;
  CUresult r = d.cuCtxGetCurrent(&context);
  if (r != 0 || !context) {
    *error = "KVAttention: no current CUDA context";
    return false;
  }
  static std::mutex mutex;
  static std::map<CUcontext, Kernels> loaded;  // one module per context
  Kernels k;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = loaded.find(context);
    if (it == loaded.end()) {
      CUmodule module = nullptr;
      if ((r = d.cuModuleLoadData(&module, kvc_fatbin_start)) != 0) {
        *error = describe(d, r, "loading the kernels (no cubin or PTX for this GPU?)");
        return false;
      }
      if ((r = d.cuModuleGetFunction(&k.update, module, "kvc_update")) != 0 ||
          (r = d.cuModuleGetFunction(&k.attend, module, "kvc_attend")) != 0) {
        *error = describe(d, r, "finding the kernels");
        return false;
      }
      it = loaded.emplace(context, k).first;
    }
    k = it->second;
  }
  const Grids g = grids(params);
  if ((r = d.cuMemsetD32Async(reinterpret_cast<unsigned long long>(params.status), 0, size_t(params.status_words),
                               stream)) != 0) {
    *error = describe(d, r, "clearing the status word and chunk counters");
    return false;
  }
  kvc_dev::Params copy = params;
  void* args[] = {&copy};
  const unsigned threads = kvc_dev::kThreads;
  struct Launch {
    CUfunction f;
    int64_t blocks, blocks_y;
    int64_t smem_floats;
    const char* name;
  } launches[] = {{k.update, g.update, 1, 0, "launching kvc_update"},
                  {k.attend, g.attend, 1, kvc_dev::attend_smem_floats(params.D, params.heads_per_block), "launching kvc_attend"}};
  for (const Launch& l : launches) {
    if (l.blocks == 0) continue;
    if (l.blocks > 0x7fffffff) {
      *error = std::string("KVAttention: ") + l.name + ": grid of " + std::to_string(l.blocks) + " blocks is too large";
      return false;
    }
    const int64_t smem = l.smem_floats * 4;
    if (smem > 48 * 1024 && (r = d.cuFuncSetAttribute(l.f, kFuncAttrMaxDynamicSharedBytes, int(smem))) != 0) {
      *error = describe(d, r, "raising the shared memory limit");
      return false;
    }
    r = d.cuLaunchKernel(l.f, unsigned(l.blocks), unsigned(l.blocks_y), 1, threads, 1, 1, unsigned(smem), stream, args,
                         nullptr);
    if (r != 0) {
      *error = describe(d, r, l.name);
      return false;
    }
  }
  return true;
}

}  // namespace kvc_trt
