# LocalMoE top-level build.
#
#   make            libmoe + moe CLI + unit tests + nginx module (.so)
#   make deps       install what is missing (Debian packages), idempotent
#   make test       deps + build + prove -r t/
#   make run        deps + build + serve conf/nginx.conf on 127.0.0.1:8000
#   make asan       the unit tests under ASan + UBSan (build/asan/)
#   make fuzz       libFuzzer harnesses, tools/fuzz/ (clang; build/fuzz/)
#   make gpu-bundle .dev/: nginx + libraries + tokenizer for a GPU machine
#   MOE_CUDA=0      force a CPU-only build even where nvcc exists

CC       ?= cc
BUILD    := build
NGX_SRC  ?= /usr/share/nginx/src
NVCC     ?= $(shell command -v nvcc 2>/dev/null || \
              ls /usr/local/cuda/bin/nvcc 2>/dev/null)
MOE_CUDA ?= $(if $(NVCC),1,0)

WARN     := -Wall -Wextra -Werror
CFLAGS   ?= -O2 -g
# -Ikernels: engine/backends/ reads the plain-C kernels/tuning.h (the CUDA
# tuning record) in every build, CPU-only included (t/layering.t allows
# kernel headers in backends/ only).
CFLAGS   += -std=c11 -D_GNU_SOURCE -fPIC -pthread $(WARN) -Iengine/include \
            -Iengine -Ikernels
LDLIBS   := -lyajl -lyaml -lpcre2-8 -lutf8proc -lpthread -lm

include bench/Makefile.inc

ENGINE_SRCS := $(wildcard engine/*/*.c)
ENGINE_SRCS := $(filter-out engine/cli/%,$(ENGINE_SRCS))
# the engine's C files include kernels/*.h too (tuning.h's defaults, fp8.h)
ENGINE_HDRS := $(wildcard engine/*/*.h) engine/include/moe.h \
               $(wildcard kernels/*.h)
ENGINE_OBJS := $(ENGINE_SRCS:%.c=$(BUILD)/%.o)
UNIT_SRCS   := $(wildcard t/unit/*.c)
UNIT_BINS   := $(UNIT_SRCS:t/unit/%.c=$(BUILD)/t/%)
KERNEL_SRCS := $(wildcard kernels/*.cu)
KERNEL_OBJS := $(KERNEL_SRCS:%.cu=$(BUILD)/%.o)
NGX_SO      := $(BUILD)/nginx/objs/ngx_http_moe_module.so

# CUDA: built where nvcc exists (CI: .ci/run compiles every .cu file when
# nvcc is there or the distribution offers it).  The CUDA backend
# (engine/backends/*.cu) is part of libmoe; it calls the kernels' launchers
# (libmoe_kernels.a), which call nothing back, so each library is listed
# once.
ifeq ($(MOE_CUDA)$(if $(KERNEL_SRCS),y,n),1y)
CUDA_HOME   ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCCFLAGS   ?= -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a \
               -Xcompiler -fPIC,-Wall,-Wextra,-Werror
KERNELS_A   := $(BUILD)/libmoe_kernels.a
include kernels/cuda.mk
CFLAGS      += -DMOE_HAVE_CUDA -Ikernels
ENGINE_CU   := $(wildcard engine/backends/*.cu)
ENGINE_OBJS_CU := $(ENGINE_CU:%.cu=$(BUILD)/%.o)
MOE_LIBS    := $(BUILD)/libmoe.a $(KERNELS_A) $(CUDA_LDLIBS)
NGX_EXTRA_LIBS := $(CURDIR)/$(KERNELS_A) $(CUDA_LDLIBS)
else
KERNELS_A   :=
ENGINE_OBJS_CU :=
MOE_LIBS    := $(BUILD)/libmoe.a
NGX_EXTRA_LIBS :=
endif

# the CUDA (and NCCL) choice as a file: objects and the nginx configure
# depend on it
CUDA_MARK   := $(BUILD)/.cuda-$(MOE_CUDA)$(if $(NCCL_CFLAGS),-nccl)

.PHONY: all deps test run clean engine module unit kernels tsan bench

all: engine unit module kernels bench

engine: $(BUILD)/libmoe.a $(BUILD)/moe $(BUILD)/quantize
unit: $(UNIT_BINS)
module: $(NGX_SO)
kernels: $(KERNELS_A)

# objects depend on the CUDA choice too (-DMOE_HAVE_CUDA changes engine.o)
$(BUILD)/%.o: %.c $(ENGINE_HDRS) \
              $(CUDA_MARK)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/libmoe.a: $(ENGINE_OBJS) $(ENGINE_OBJS_CU)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(BUILD)/moe: engine/cli/moe.c $(BUILD)/libmoe.a $(KERNELS_A)
	$(CC) $(CFLAGS) -o $@ $< $(MOE_LIBS) $(LDLIBS)

# The quantizer (tools/quantize.c): quantized copies of a float model in
# each layout libmoe loads (engine/model/quant.h), for t/quant.t and the
# GPU tests; `make quant-models` writes them to build/quant/.
$(BUILD)/quantize: tools/quantize.c $(BUILD)/libmoe.a $(KERNELS_A)
	$(CC) $(CFLAGS) -o $@ $< $(MOE_LIBS) $(LDLIBS)

.PHONY: quant-models
quant-models: $(BUILD)/quantize
	@tools/quant_models.sh $(BUILD)/quant

$(BUILD)/t/%: t/unit/%.c $(BUILD)/libmoe.a $(KERNELS_A) $(wildcard t/unit/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -It/unit -o $@ $< $(MOE_LIBS) $(LDLIBS)

# The ring stress test, the tensor-parallel ranks (threads with a shared
# all-reduce) and the engine test (engine thread, rings, wake-ups, the
# hold hook) again under ThreadSanitizer (clang or gcc).
tsan: $(BUILD)/t/ring_tsan $(BUILD)/t/tp_tsan $(BUILD)/t/engine_tsan
$(BUILD)/t/ring_tsan: t/unit/ring.c engine/sched/ring.c engine/sched/ring.h
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -O1 -g -fsanitize=thread -pthread $(WARN) \
	    -Iengine/include -Iengine -It/unit -o $@ t/unit/ring.c \
	    engine/sched/ring.c
$(BUILD)/t/%_tsan: t/unit/%.c $(ENGINE_SRCS) $(ENGINE_HDRS)
	@mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -O1 -g -fsanitize=thread -pthread $(WARN) \
	    -Iengine/include -Iengine -Ikernels -It/unit -o $@ $< \
	    $(ENGINE_SRCS) \
	    $(LDLIBS)

# The unit tests again under AddressSanitizer + UndefinedBehaviorSanitizer
# (LeakSanitizer included): libmoe's C sources (CPU-only) and each test in
# build/asan/, then run by prove; any sanitizer report exits non-zero and
# fails the run.  The tokenizer test needs tools/fetch_tokenizers.sh's files.
ASAN_FLAGS := -std=c11 -D_GNU_SOURCE -pthread $(WARN) -O1 -g \
              -fsanitize=address,undefined -fno-omit-frame-pointer \
              -fno-sanitize-recover=undefined -Iengine/include -Iengine \
              -Ikernels
ASAN_TESTS := tokenizer jinja safetensors config engine sampling ring swap \
              forward kjv tp backend cuda_tuning guided logprobs choices \
              toolcall prefix_key stallfree rope logit_bias share kv_grow \
              quant
ASAN_BINS  := $(patsubst %,$(BUILD)/asan/t/%,$(filter $(ASAN_TESTS), \
              $(UNIT_SRCS:t/unit/%.c=%)))
ASAN_OBJS  := $(ENGINE_SRCS:%.c=$(BUILD)/asan/%.o)
ASAN_OPTS  := detect_leaks=1:detect_stack_use_after_return=1
ASAN_OPTS  := $(ASAN_OPTS):check_initialization_order=1:strict_init_order=1
ASAN_ENV   := MOE_SRCDIR=$(CURDIR) \
              ASAN_OPTIONS=$(ASAN_OPTS) \
              UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

.PHONY: asan asan-build
asan: asan-build $(BUILD)/quantize
	@tools/fetch_tokenizers.sh > /dev/null
	@tools/quant_models.sh $(BUILD)/quant
	$(ASAN_ENV) prove --exec '' $(ASAN_BINS)
asan-build: $(ASAN_BINS)

# yajl_tree grows arrays one element per realloc, which ASan's realloc makes
# quadratic (a 128k-token tokenizer.json takes hours): link a copy of yajl
# whose allocations go through t/asan/yajl_alloc.c (capacity doubling).
ifneq ($(BENCH_YAJL_A),)
ASAN_YAJL  := $(BUILD)/asan/yajl.o $(BUILD)/asan/yajl_alloc.o
$(BUILD)/asan/yajl.o: $(BENCH_YAJL_A)
	@rm -rf $(BUILD)/asan/yajl && mkdir -p $(BUILD)/asan/yajl
	cd $(BUILD)/asan/yajl && ar x $(BENCH_YAJL_A) && ld -r -o all.o *.o
	objcopy $(foreach f,malloc calloc realloc free, \
	    --redefine-sym $(f)=moe_asan_yajl_$(f)) $(BUILD)/asan/yajl/all.o $@
$(BUILD)/asan/yajl_alloc.o: t/asan/yajl_alloc.c
	$(CC) $(ASAN_FLAGS) -c -o $@ $<
endif
$(BUILD)/asan/engine/%.o: engine/%.c $(ENGINE_HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_FLAGS) -c -o $@ $<
$(BUILD)/asan/libmoe.a: $(ASAN_OBJS)
	rm -f $@ && ar rcs $@ $^
$(BUILD)/asan/t/%: t/unit/%.c $(BUILD)/asan/libmoe.a $(ASAN_YAJL) \
                   $(wildcard t/unit/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_FLAGS) -It/unit -o $@ $< $(BUILD)/asan/libmoe.a \
	    $(ASAN_YAJL) $(LDLIBS)

# Coverage-guided fuzzing (libFuzzer; clang only; not part of all or
# test): each tools/fuzz/NAME.c is one harness, linked against libmoe's C
# sources built with ASan + UBSan and libFuzzer's coverage counters in
# build/fuzz/.  What a client request controls (guides, prompt text, token
# ids, tool-call output): tools/fuzz/README.md; the files a user points the
# server at (safetensors, config.json and its quantization_config,
# tokenizer.json, the YAML config; make fuzz-files builds just those):
# tools/fuzz/FILES.md.  yajl is the ASan build's copy (see below): its
# allocation shims are compiled again here, by clang.
FUZZ_CC    ?= clang
FUZZ_FLAGS := $(ASAN_FLAGS) -fsanitize=fuzzer-no-link
FUZZ_SRCS  := $(wildcard tools/fuzz/*.c)
FUZZ_BINS  := $(FUZZ_SRCS:tools/fuzz/%.c=$(BUILD)/fuzz/%)
FUZZ_OBJS  := $(ENGINE_SRCS:%.c=$(BUILD)/fuzz/%.o)
FUZZ_YAJL  := $(if $(BENCH_YAJL_A),$(BUILD)/asan/yajl.o \
              $(BUILD)/fuzz/yajl_alloc.o)

.PHONY: fuzz
fuzz: $(FUZZ_BINS)
$(BUILD)/fuzz/engine/%.o: engine/%.c $(ENGINE_HDRS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -c -o $@ $<
$(BUILD)/fuzz/yajl_alloc.o: t/asan/yajl_alloc.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -c -o $@ $<
$(BUILD)/fuzz/libmoe.a: $(FUZZ_OBJS)
	rm -f $@ && ar rcs $@ $^
$(BUILD)/fuzz/%: tools/fuzz/%.c $(wildcard tools/fuzz/*.h) \
                 $(BUILD)/fuzz/libmoe.a $(FUZZ_YAJL)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer -o $@ $< \
	    $(BUILD)/fuzz/libmoe.a $(FUZZ_YAJL) $(LDLIBS)

FUZZ_FILES := safetensors config quant tokenizer_json yaml
.PHONY: fuzz-files
fuzz-files: $(FUZZ_FILES:%=$(BUILD)/fuzz/fuzz_%)

# kernels/ sees only its own headers: it includes nothing from engine/.
$(BUILD)/kernels/%.o: kernels/%.cu $(wildcard kernels/*.h kernels/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -Ikernels -c -o $@ $<

# The CUDA backend: engine code compiled by nvcc, calling the launchers.
$(BUILD)/engine/%.o: engine/%.cu $(ENGINE_HDRS) $(wildcard kernels/*.h \
                     kernels/*.cuh) $(CUDA_MARK)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -DMOE_HAVE_CUDA $(NCCL_CFLAGS) -Ikernels \
	    -Iengine/include -Iengine -c -o $@ $<

$(BUILD)/libmoe_kernels.a: $(KERNEL_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# The dynamic module, built against Debian's nginx-dev tree with Debian's
# own configure flags so that the .so loads into /usr/sbin/nginx.
$(BUILD)/nginx/Makefile: config $(CUDA_MARK)
	@test -d $(NGX_SRC) || { echo "nginx-dev missing: run make deps"; exit 1; }
	rm -rf $(BUILD)/nginx && mkdir -p $(BUILD)/nginx
	cp -r $(NGX_SRC)/. $(BUILD)/nginx/
	cd $(BUILD)/nginx && MOE_EXTRA_LIBS="$(NGX_EXTRA_LIBS)" \
	    bash -c '. ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	    --add-dynamic-module=$(CURDIR)' > configure.log 2>&1 || \
	    { tail -30 $(BUILD)/nginx/configure.log; exit 1; }
	touch $@

# reconfigure nginx when the CUDA choice changes
$(CUDA_MARK):
	@mkdir -p $(BUILD) && rm -f $(BUILD)/.cuda-* && touch $@

$(NGX_SO): $(BUILD)/nginx/Makefile $(BUILD)/libmoe.a $(KERNELS_A) \
           $(wildcard ngx_moe_module/*.c ngx_moe_module/*.h)
	@# nginx's own Makefile does not know the .so depends on libmoe.a
	rm -f $@
	$(MAKE) -C $(BUILD)/nginx -f objs/Makefile modules \
	    CFLAGS="$$(sed -n 's/^CFLAGS = //p' $(BUILD)/nginx/objs/Makefile) -Werror"

# Everything a GPU machine without a package registry needs beside the
# build outputs (nginx, the shared libraries that are not glibc / GCC /
# CUDA, the bench model's tokenizer) in .dev/ (ignored); .dev/MANIFEST
# lists it.  README, GPUs: what to carry.
.PHONY: gpu-bundle
gpu-bundle: engine module bench $(if $(KERNELS_A),gpu)
	@tools/gpu_bundle.sh

deps:
	@tools/deps.sh

test: deps
	$(MAKE) all
	$(MAKE) tsan
	prove -r t/

run: deps
	$(MAKE) engine module
	@tools/serve.sh

clean:
	rm -rf $(BUILD)
