// Host-side launch of the decode kernel, one instantiation per state dtype (decode_state_fp32.cu,
// decode_state_bf16.cu), so the two compile in parallel.
#pragma once

#include <cuda_runtime.h>

#include "decode/decode_params.h"

namespace kda_serving::decode {

template <typename StateT>
cudaError_t launch_decode(const DecodeParams& params, cudaStream_t stream);

}  // namespace kda_serving::decode
