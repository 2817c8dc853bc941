#include "decode/decode_launch_impl.cuh"

namespace kda_serving::decode {
template cudaError_t launch_decode<float>(const DecodeParams&, cudaStream_t);
}
