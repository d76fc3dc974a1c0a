// The GPU kernels: each runs one work item of a block program of programs.h per CUDA block.
// Compiled by nvcc into a fat binary (cubins for SM 80/86/89/90/120 and PTX) that the plugin
// library embeds and loads through the CUDA driver API (cuda_driver.cc).  -fmad=false: the
// programs round like the CPU build the tests run.
#include "programs.h"

using kvc_dev::Block;
using kvc_dev::Params;

extern "C" __global__ void __launch_bounds__(kvc_dev::kThreads) kvc_update(const Params p) {
  kvc_dev::update_program(p, blockIdx.x, Block{threadIdx.x, blockDim.x});
}

extern "C" __global__ void __launch_bounds__(kvc_dev::kThreads) kvc_attend(const Params p) {
  extern __shared__ float smem[];
  kvc_dev::attend_program(p, blockIdx.x, Block{threadIdx.x, blockDim.x}, smem);
}
