# CUDA backend, GPU tests and the engine benchmark.  Included by the
# top-level Makefile inside its `ifeq ($(MOE_CUDA)...,1y)` block, after the
# variables NVCC, NVCCFLAGS, BUILD, CUDA_HOME and KERNELS_A are set.
#
#   make gpu     build/libmoe_kernels.a + build/gpu/test_kernels,
#                build/gpu/test_backend, build/gpu/test_sample,
#                build/gpu/bench_engine
#

CUDA_LIBDIR  := $(CUDA_HOME)/lib64
CUDA_LDLIBS  := -L$(CUDA_LIBDIR) -Wl,-rpath,$(CUDA_LIBDIR) -lcublas -lcudart \
                -lstdc++
GPU_NVCCFLAGS := -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
                 -Xcompiler -Wall,-Wextra,-Werror \
                 -Ikernels -Iengine/include -Iengine -It/unit -It/gpu
GPU_BINS     := $(BUILD)/gpu/test_kernels $(BUILD)/gpu/test_backend \
                $(BUILD)/gpu/test_sample $(BUILD)/gpu/bench_engine \
                $(BUILD)/gpu/test_ggemm $(BUILD)/gpu/test_convert

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
