# CUDA backend, GPU tests and the engine benchmark.  Included by the
# top-level Makefile inside its `ifeq ($(MOE_CUDA)...,1y)` block, after the
# variables NVCC, NVCCFLAGS, BUILD, CUDA_HOME and KERNELS_A are set.
#
#   make gpu        build/libmoe_kernels.a + build/gpu/test_kernels,
#                   build/gpu/test_backend, build/gpu/test_sample,
#                   build/gpu/test_ggemm, build/gpu/test_fp8mma,
#                   build/gpu/test_quant, build/gpu/test_q4tiled,
#                   build/gpu/test_q4group,
#                   build/gpu/test_kvfp8, build/gpu/bench_engine,
#                   build/gpu/test_tp, build/gpu/test_mask,
#                   build/gpu/test_logprobs, build/gpu/test_logit_bias,
#                   build/gpu/test_qbackend, build/gpu/test_gemm_fp8,
#                   build/gpu/test_fp8_grouped,
#                   build/gpu/test_share
#   make bench-dev  the kernel dev harness (bench/dev/*.cu):
#                   build/bench/dev/attention, .../moe_gemv,
#                   .../moe_ggemm, .../quant_gemv, .../gemm_fp8,
#                   .../silu_quant; each runs the shipped launcher
#                   against the variants that do not ship
#                   (kernels/TUNING.md); .../wg_ggemm times a grouped
#                   wgmma GEMM against the per-expert cuBLASLt calls;
#                   libktrace.so records a kernel timeline
#

CUDA_LIBDIR  := $(CUDA_HOME)/lib64
CUDA_LDLIBS  := -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcublasLt -lcublas -lcudart \
                -lstdc++

# NCCL (collectives between GPU ranks, engine/backends/cuda_backend.cu):
# nccl.h beside the CUDA headers (or the system's), libnccl beside cuBLAS
# or the system library (Debian/Ubuntu: libnccl2 + libnccl-dev).  Found:
# -DMOE_HAVE_NCCL and libnccl linked; not found (or MOE_NCCL=0): the
# tensor-parallel ranks keep the peer-access sum (kernels/tp_sum.cu).
MOE_NCCL     ?= 1
ifeq ($(MOE_NCCL),1)
NCCL_H       := $(firstword $(wildcard $(CUDA_HOME)/include/nccl.h \
                  /usr/include/nccl.h /usr/local/include/nccl.h))
NCCL_SO      := $(firstword $(wildcard $(CUDA_LIBDIR)/libnccl.so \
                  /usr/lib/x86_64-linux-gnu/libnccl.so \
                  /lib/x86_64-linux-gnu/libnccl.so \
                  /usr/lib/x86_64-linux-gnu/libnccl.so.2 \
                  /lib/x86_64-linux-gnu/libnccl.so.2 \
                  /usr/lib/aarch64-linux-gnu/libnccl.so))
endif
ifneq ($(and $(NCCL_H),$(NCCL_SO)),)
NCCL_CFLAGS  := -DMOE_HAVE_NCCL -I$(dir $(NCCL_H))
CUDA_LDLIBS  += -Wl,-rpath,$(dir $(NCCL_SO)) $(NCCL_SO)
else
NCCL_CFLAGS  :=
endif
GPU_NVCCFLAGS := -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
                 -Xcompiler -Wall,-Wextra,-Werror \
                 -Ikernels -Iengine/include -Iengine -It/unit -It/gpu \
                 $(NCCL_CFLAGS)
GPU_BINS     := $(BUILD)/gpu/test_kernels $(BUILD)/gpu/test_backend \
                $(BUILD)/gpu/test_sample $(BUILD)/gpu/bench_engine \
                $(BUILD)/gpu/test_ggemm $(BUILD)/gpu/test_fp8mma \
                $(BUILD)/gpu/test_convert \
                $(BUILD)/gpu/test_tp \
                $(BUILD)/gpu/test_quant $(BUILD)/gpu/test_kvfp8 \
                $(BUILD)/gpu/test_q4tiled \
                $(BUILD)/gpu/test_q4group \
                $(BUILD)/gpu/test_mask \
                $(BUILD)/gpu/test_logprobs \
                $(BUILD)/gpu/test_logit_bias \
                $(BUILD)/gpu/test_qbackend \
                $(BUILD)/gpu/test_gemm_fp8 \
                $(BUILD)/gpu/test_fp8_grouped \
                $(BUILD)/gpu/test_share

.PHONY: gpu
gpu: $(KERNELS_A) $(GPU_BINS)

$(BUILD)/gpu/%.o: t/gpu/%.cu $(wildcard t/gpu/*.h kernels/*.h) $(ENGINE_HDRS)
	@mkdir -p $(dir $@)
	$(NVCC) $(GPU_NVCCFLAGS) -c -o $@ $<

$(BUILD)/gpu/bench_engine.o: bench/engine.cu $(wildcard kernels/*.h) \
                             $(ENGINE_HDRS)
	@mkdir -p $(dir $@)
	$(NVCC) $(GPU_NVCCFLAGS) -c -o $@ $<

# Link with the host compiler: libmoe, then the kernels it calls.
$(BUILD)/gpu/%: $(BUILD)/gpu/%.o $(KERNELS_A) $(BUILD)/libmoe.a
	$(CC) -o $@ $< $(BUILD)/libmoe.a $(KERNELS_A) $(CUDA_LDLIBS) $(LDLIBS)

# The dev harness: each program compiles one kernel source into itself
# (the variants are instantiations of the shipped templates, built with
# the library's flags) and links the rest from libmoe_kernels.a.
DEV_BINS := $(patsubst bench/dev/%.cu,$(BUILD)/bench/dev/%, \
              $(wildcard bench/dev/*.cu))

.PHONY: bench-dev
bench-dev: $(DEV_BINS) $(BUILD)/bench/dev/libktrace.so

# CUPTI kernel timeline (LD_PRELOAD; bench/dev/ktrace.c, tools/ktrace_gaps.py)
$(BUILD)/bench/dev/libktrace.so: bench/dev/ktrace.c
	@mkdir -p $(@D)
	$(CC) -O2 -std=c11 -D_GNU_SOURCE -fPIC -shared -Wall -Wextra -Werror \
	    -I$(CUDA_HOME)/include -o $@ $< -L$(CUDA_HOME)/lib64 \
	    -Wl,-rpath,'$$ORIGIN' -Wl,-rpath,$(CUDA_HOME)/lib64 -lcupti
	cp -L $(CUDA_HOME)/lib64/libcupti.so.13 $(@D)/ 2>/dev/null && \
	    chmod +x $(@D)/libcupti.so.13 || true

$(BUILD)/bench/dev/%.o: bench/dev/%.cu bench/dev/dev.cuh t/gpu/gpu_util.h \
                        kernels/%.cu $(wildcard kernels/*.h kernels/*.cuh) \
                        $(wildcard bench/dev/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Ikernels -It/gpu -c -o $@ $<

# harnesses named after a pass rather than their kernels/ file
$(BUILD)/bench/dev/silu_quant.o: bench/dev/silu_quant.cu bench/dev/dev.cuh \
                        t/gpu/gpu_util.h kernels/gemm_fp8.cu \
                        $(wildcard kernels/*.h kernels/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Ikernels -It/gpu -c -o $@ $<

$(BUILD)/bench/dev/wg_ggemm.o: bench/dev/wg_ggemm.cu bench/dev/dev.cuh \
                        t/gpu/gpu_util.h $(wildcard kernels/*.h kernels/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Ikernels -It/gpu -c -o $@ $<

$(BUILD)/bench/dev/%: $(BUILD)/bench/dev/%.o $(KERNELS_A)
	$(CC) -o $@ $< $(KERNELS_A) $(CUDA_LDLIBS) -lm

.PRECIOUS: $(BUILD)/bench/dev/%.o
