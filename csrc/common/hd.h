// DF_HD: functions compiled for both the host (C++ CPU kernels, CI) and the device (CUDA kernels).
#pragma once

#ifndef DF_HD
#ifdef __CUDACC__
#define DF_HD __host__ __device__ __forceinline__
#else
#define DF_HD inline
#endif
#endif
