#include "decode/decode_launch_impl.cuh"

namespace kda_serving::decode {
template cudaError_t launch_decode<__nv_bfloat16>(const DecodeParams&, cudaStream_t);
}
