// The CUDA driver API, opened at run time: build machines have no libcuda.so.1, and the plugin
// library must load there (TensorRT builds engines on CPU) and link nothing from CUDA.
#pragma once

#include <cstddef>
#include <string>

#include "programs.h"

namespace kvc_trt {

// Launch the three kernels for `params` on `stream` (a cudaStream_t / CUstream).  Loads the
// embedded fat binary into the current context on first use.  False with a reason on failure.
bool launch_on_gpu(const kvc_dev::Params& params, void* stream, std::string* error);

// The embedded fat binary (for the tests: kernel names, parameter sizes, architectures).
const unsigned char* fatbin_data(size_t* size);

}  // namespace kvc_trt
