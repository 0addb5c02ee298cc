# CUDA backend, GPU tests and the engine benchmark.  Included by the
# top-level Makefile inside its `ifeq ($(MOE_CUDA)...,1y)` block, after the
# variables NVCC, NVCCFLAGS, BUILD, CUDA_HOME and KERNELS_A are set.
#
#   make gpu     build/libmoe_kernels.a + build/gpu/test_kernels,
#                build/gpu/test_backend, build/gpu/test_sample,
#                build/gpu/bench_engine
#
# cuda_backend.cu includes engine/model.h, so every kernel object gets
# -Iengine (see the pattern rule override below).

CUDA_LIBDIR  := $(CUDA_HOME)/lib64
CUDA_LDLIBS  := -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcublas -lcudart \
                -lstdc++
GPU_NVCCFLAGS := -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
                 -Xcompiler -Wall,-Wextra,-Werror \
                 -Ikernels -Iengine/include -Iengine -It/unit -It/gpu
GPU_BINS     := $(BUILD)/gpu/test_kernels $(BUILD)/gpu/test_backend \
                $(BUILD)/gpu/test_sample $(BUILD)/gpu/bench_engine \
                $(BUILD)/gpu/test_ggemm

.PHONY: gpu
gpu: $(KERNELS_A) $(GPU_BINS)

$(BUILD)/gpu/%.o: t/gpu/%.cu $(wildcard t/gpu/*.h kernels/*.h) \
                  $(wildcard engine/*.h) engine/include/moe.h
	@mkdir -p $(dir $@)
	$(NVCC) $(GPU_NVCCFLAGS) -c -o $@ $<

$(BUILD)/gpu/bench_engine.o: bench/engine.cu $(wildcard kernels/*.h) \
                             $(wildcard engine/*.h) engine/include/moe.h
	@mkdir -p $(dir $@)
	$(NVCC) $(GPU_NVCCFLAGS) -c -o $@ $<

# Link with the host compiler: kernels lib first (it calls into libmoe).
$(BUILD)/gpu/%: $(BUILD)/gpu/%.o $(KERNELS_A) $(BUILD)/libmoe.a
	$(CC) -o $@ $< $(KERNELS_A) $(BUILD)/libmoe.a $(CUDA_LDLIBS) $(LDLIBS)
