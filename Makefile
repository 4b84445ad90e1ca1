# moe.c build.
#   make            build ./moe (installs missing Debian packages first, see `make deps`)
#   make test       build and run every test (C suites and the PyTorch comparison)
#   make bench      benchmark (not a test): peaks, training phases, one MoE layer; bench.csv
#   make bench-peer moe.c's tokens/s over PyTorch's (Debian's; PyPI's, eager and compiled) on small
#   make bench-gpu  the GPU part of make bench alone; bench-gpu-peer: against PyTorch on the GPU
#   make bench-dist configs/small.ini in one process and under mpirun -np 2 (DP, ZeRO-1, EP)
#   make gpu-bundle pack binaries and libraries for tests/cuda/gpu_check.sh on a GPU machine
#   make deps       install the Debian packages the build needs (apt-get; root or sudo)
#   make deps-test  install the packages the tests need (PyTorch, h5py, pytest, cmocka,
#                   gnuplot for the figures of moe ablate / moe route / report.html,
#                   headless Chromium and Pillow for tests/test_report.py)
#   make fuzz       run every fuzz target (tests/fuzz/) for FUZZ_SECONDS (60) each;
#                   make fuzz-smoke: 20 s each (CI). Builds under build/fuzz with clang.
#   make SANITIZE=1 test   the tests on an ASan + UBSan build (build/asan, CPU only)
#   make clean
#
# Two builds of the same sources: build/f32 (the `moe` binary, real = float) and
# build/f64 (real = double, linked into the C test suites for finite differences).

CC ?= gcc
PYTHON_REF := /usr/bin/python3
BUILD := build
# The binary the tests run (tests/*.py read MOE_BIN and MOE_BUILD, defaulting to these).
MOE_BIN := moe

# SANITIZE=1: AddressSanitizer and UndefinedBehaviorSanitizer on every object, in a build
# directory of its own so the two builds never mix; CPU only (nvcc's objects are not
# instrumented). The binary is build/asan/moe; `make SANITIZE=1 test` points the tests at
# it. LSan's suppressions name third-party leaks only (tests/sanitizers/lsan.supp).
ifeq ($(SANITIZE),1)
BUILD := build/asan
MOE_BIN := $(BUILD)/moe
NVCC :=
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -fno-omit-frame-pointer
export ASAN_OPTIONS := detect_leaks=1:abort_on_error=0:exitcode=86
export LSAN_OPTIONS := suppressions=$(abspath tests/sanitizers/lsan.supp):print_suppressions=0
export UBSAN_OPTIONS := print_stacktrace=1:halt_on_error=1
endif
.DEFAULT_GOAL := all

BUILD_PKGS := gcc make pkg-config libhdf5-dev libcsv-dev libopenblas-openmp-dev libinih-dev zlib1g-dev \
    libcjson-dev g++ libpcre2-dev libsentencepiece-dev libunistring-dev libopenmpi-dev openmpi-bin
TEST_PKGS := libcmocka-dev python3-torch python3-h5py python3-numpy python3-pytest gnuplot-nox \
    python3-pip python3-venv chromium python3-pil
# Python's own safetensors package reads our export in tests/test_hf.py. Debian 12 does not
# package it: it comes from PyPI (a prebuilt wheel) into Debian's interpreter.
TEST_PIP := safetensors==0.4.5
# The tokenizer references (tests/test_tokenizer.py): PyPI's tokenizers and sentencepiece,
# and transformers' AutoTokenizer (protobuf: its SentencePiece conversion) for exports, in
# a venv of their own, so that Debian's interpreter keeps its packages.
TOK_VENV := $(BUILD)/venv-tok
TOK_PIP := tokenizers==0.20.3 sentencepiece==0.2.0 transformers==4.46.3 protobuf==4.25.5
# transformers' own Mixtral, OLMoE and Qwen2-MoE classes check import and export
# (tests/reference/test_families_transformers.py): 4.45.2 runs on Debian's torch 1.13, in a
# venv that sees Debian's packages. Qwen3-MoE needs torch 2 (by hand: families_transformers.py).
HF_VENV := $(BUILD)/venv-hf
HF_PIP := transformers==4.45.2
# make bench-peer's current PyTorch (eager and torch.compile), made by that target alone:
# PyPI's torch brings its CUDA wheels (about 5 GB), which neither make test nor the CI needs.
TORCH_VENV := $(BUILD)/venv-torch
TORCH_PIP := torch==2.15.0 numpy==2.4.6

missing_pkgs = $(shell for p in $(1); do \
    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done)

# -O3 vectorises the element loops (gather, combine, norms: 40% off dispatch/combine,
# make bench); without -ffast-math it reorders no floating-point sum. -fno-trapping-math:
# nothing here unmasks floating-point exceptions, and saying so lets GCC vectorise loops
# with clamps and selects (kernels/cpu/vexp.h); it changes no result either.
# -fno-math-errno: nothing reads errno after sqrt, so sqrt may be the vector instruction
# (AdamW's update) instead of a scalar one with a library call behind it; same results.
CFLAGS_BASE := -std=c11 -O3 -g -Wall -Wextra -Wshadow -fopenmp -fno-trapping-math -fno-math-errno \
    -D_GNU_SOURCE -MMD -MP
# Tokenizers (data/): PCRE2 for the pre-tokenizer regexes, libunistring for NFC, and
# libsentencepiece, whose C++ API data/spm.cpp wraps (hence libstdc++).
TOKENIZER_LIBS := -lpcre2-8 -lunistring -lsentencepiece -lsentencepiece_train -lstdc++
LDLIBS_BASE := -lcsv -lz -lm -fopenmp $(TOKENIZER_LIBS)
# UBSan's vptr check needs the C++ runtime of UBSan, which the C driver does not link.
CXXFLAGS_LIB = -std=c++17 -O2 -g -Wall -Wextra -MMD -MP $(SAN_FLAGS) \
    $(if $(SAN_FLAGS),-fno-sanitize=vptr)

# OpenBLAS's OpenMP build shares our OpenMP thread pool; Debian's default pthread build
# spins its own threads against ours (30x slower on small ops, 2 cores). Linked by path
# and rpath, so the system's libopenblas.so.0 alternative does not matter.
OPENBLAS_PC := /usr/lib/$(shell gcc -print-multiarch)/openblas-openmp/pkgconfig

# Package flags are probed once, after `make deps` has run, and cached in build/config.mk
# (GNU make rebuilds an included makefile and restarts, so the probe sees the packages).
ifeq ($(filter clean deps deps-test,$(MAKECMDGOALS)),)
-include $(BUILD)/config.mk
endif

$(BUILD)/config.mk: Makefile
	@$(MAKE) --no-print-directory deps
	@mkdir -p $(BUILD)
	@$(if $(NVCC),bash kernels/cuda/fetch_cudnn_frontend.sh $(CUDNN_FE_DIR) $(CUDNN_FE_VERSION) $(PYTHON_REF))
	@echo "CUDNN_FE_INC := $$(test -f $(CUDNN_FE_DIR)/include/cudnn_frontend.h && echo $(CUDNN_FE_DIR)/include)" > $@.tmp
	@echo "PKG_CFLAGS := $$(PKG_CONFIG_PATH=$(OPENBLAS_PC) pkg-config --cflags hdf5 openblas inih libcjson ompi-c)" >> $@.tmp
	@echo "PKG_LIBS := $$(PKG_CONFIG_PATH=$(OPENBLAS_PC) pkg-config --libs hdf5 openblas inih libcjson ompi-c) \
	  -Wl,-rpath,$$(PKG_CONFIG_PATH=$(OPENBLAS_PC) pkg-config --variable=libdir openblas)" >> $@.tmp
	@mv $@.tmp $@

CFLAGS = $(CFLAGS_BASE) $(SAN_FLAGS) $(PKG_CFLAGS) $(EXTRA_CFLAGS)
LDLIBS = $(PKG_LIBS) $(LDLIBS_BASE) $(SAN_FLAGS)

# Rooms, bottom up: base <- kernels <- model, optim, data, dist <- train; inside train:
# train/config.* (RunConfig: every room's section) <- train/formats (checkpoints, HDF5,
# safetensors, Hugging Face) <- train (the training loop and what the commands share)
# <- train/cli (main and the commands). config sits under formats/ because a checkpoint
# stores a whole RunConfig and an import makes one.
LIB_SRC := $(filter-out dist/nccl.c,$(wildcard base/*.c kernels/*.c kernels/cpu/*.c model/*.c \
    optim/*.c data/*.c dist/*.c))
TRAIN_SRC := $(wildcard train/*.c train/formats/*.c train/cli/*.c)
# C++ in the library rooms (data/spm.cpp: SentencePiece's C++ API behind C functions).
LIB_CPP := $(wildcard data/*.cpp)
TEST_SUITES := $(patsubst tests/%.c,$(BUILD)/tests/%,$(wildcard tests/test_*.c))

# CUDA backend (kernels/cuda/*.cu): compiled into the f32 build (./moe, the benchmark,
# build/tests/cuda_ops) whenever nvcc is found, on PATH or in /usr/local/cuda/bin;
# `make NVCC=` builds without it. Target architecture: `make CUDA_ARCH=80` (default 90,
# H100). The f64 test build never includes CUDA. libcudart is an ordinary shared library:
# with no GPU driver ./moe still runs on the CPU, and asking for train.device=cuda says
# why it is unavailable (kernels/backend.c).
comma := ,
ifeq ($(origin NVCC),undefined)
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
endif
CUDA_ARCH ?= 90
CUDA_SRC := $(if $(NVCC),$(wildcard kernels/cuda/*.cu))
# Host-only C++ of the backend (kernels/cuda/*.cpp, no kernels): g++ compiles it.
CUDA_CPP := $(if $(NVCC),$(wildcard kernels/cuda/*.cpp))
# strip: with no CUDA sources the two empty lists still leave their separating space, and
# `ifneq ($(CUDA_OBJ),)` below would take that for a CUDA build.
# dist/nccl.c: the collectives on device tensors (NCCL, from the CUDA toolkit), with the
# CUDA backend only; dist.c calls it under MOE_NCCL.
CUDA_OBJ := $(strip $(patsubst %.cu,$(BUILD)/f32/%.o,$(CUDA_SRC)) \
    $(patsubst %.cpp,$(BUILD)/f32/%.o,$(CUDA_CPP)) $(if $(NVCC),$(BUILD)/f32/dist/nccl.o))
CUDA_LIBDIR := $(wildcard $(patsubst %/bin/nvcc,%,$(NVCC))/lib64)
# cuBLAS is not linked: the backend opens it (dlopen, through this rpath) when asked for,
# so CPU runs do not pay its load time.
CUDA_LIBS := $(if $(CUDA_LIBDIR),-L$(CUDA_LIBDIR) -Wl$(comma)-rpath$(comma)$(CUDA_LIBDIR)) \
    -lcudart -ldl -lstdc++
NVCCFLAGS := -O2 -std=c++17 -arch=sm_$(CUDA_ARCH) -DMOE_CUDA_ARCH=\"$(CUDA_ARCH)\" \
    -Xcompiler=-Wall,-Wextra
# cuDNN's fused attention goes through cuDNN's C++ frontend: header-only, not in Debian,
# fetched once from PyPI (nvidia-cudnn-frontend) into build/ with the package probe, so
# nvcc machines need python3-pip. libcudnn itself is opened at run time, like cuBLAS.
# Without the headers (no network) the backend keeps the plain attention kernels.
CUDNN_FE_VERSION := 1.32.0
CUDNN_FE_DIR := $(BUILD)/third_party/cudnn-frontend-$(CUDNN_FE_VERSION)
BUILD_PKGS += $(if $(NVCC),python3-pip g++)
# -O1: host code that builds cuDNN graphs once per run (-O2 doubles the build time);
# the frontend's JSON support (serialising graphs) is not used.
CUDA_CXXFLAGS := -std=c++17 -O1 -Wall -Wextra -MMD -MP \
    -isystem $(patsubst %/bin/nvcc,%,$(NVCC))/include \
    $(if $(CUDNN_FE_INC),-isystem $(CUDNN_FE_INC) -DMOE_CUDNN_FE \
        -DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING -DCUDNN_FRONTEND_SKIP_JSON_LIB)

F32_LIB := $(patsubst %.c,$(BUILD)/f32/%.o,$(LIB_SRC)) \
    $(patsubst %.cpp,$(BUILD)/f32/%.o,$(LIB_CPP)) $(CUDA_OBJ)
F32_TRAIN := $(patsubst %.c,$(BUILD)/f32/%.o,$(TRAIN_SRC))
F64_LIB := $(patsubst %.c,$(BUILD)/f64/%.o,$(LIB_SRC)) $(patsubst %.cpp,$(BUILD)/f64/%.o,$(LIB_CPP))
# The C suites also link train/ (checkpoint, config, ...), all of it but the CLI's main.
F64_TRAIN := $(patsubst %.c,$(BUILD)/f64/%.o,$(filter-out train/cli/main.c,$(TRAIN_SRC)))
F64_TESTLIB := $(BUILD)/f64/tests/testlib.o

.PHONY: all test deps deps-test clean
all: $(MOE_BIN)

$(MOE_BIN): $(F32_LIB) $(F32_TRAIN)
	$(CC) -o $@ $^ $(LDLIBS)

$(BUILD)/f32/%.o: %.c | $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/f64/%.o: %.c | $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DMOE_REAL_F64 -c $< -o $@

# Two rules: one pattern rule with both targets would be one recipe making both.
$(BUILD)/f32/data/%.o: data/%.cpp | $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS_LIB) -c $< -o $@
$(BUILD)/f64/data/%.o: data/%.cpp | $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS_LIB) -c $< -o $@

# Test sources include cmocka's header: under `make -j test` they must wait for deps-test
# (a stamp, so the package check runs once). The shorter stem makes make prefer this rule.
$(BUILD)/deps-test.stamp: Makefile | $(BUILD)/config.mk
	@$(MAKE) --no-print-directory deps-test
	@touch $@
$(BUILD)/f64/tests/%.o: tests/%.c | $(BUILD)/config.mk $(BUILD)/deps-test.stamp
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -DMOE_REAL_F64 -c $< -o $@

# The fp64 objects are prerequisites of pattern rules only, which makes them intermediate
# files: keep them between runs. Only those: with every target secondary, a missing
# object or stamp no longer forced a rebuild (a CPU-only build followed by `make` with
# nvcc kept the CPU binary).
.SECONDARY: $(patsubst tests/%.c,$(BUILD)/f64/tests/%.o,$(wildcard tests/test_*.c)) \
    $(F64_TESTLIB) $(F64_LIB) $(F64_TRAIN)

# CUDA: nvcc objects, the -DMOE_CUDA switch of backend.c, the CUDA libraries on every f32
# link, and the CUDA op tests (tests/test_cuda.py runs them, or skips saying why). The
# stamp names the CUDA setting (off, or the architecture): when it changes, backend.c and
# the CUDA objects rebuild and a stale CUDA test binary goes.
CUDA_STAMP := $(BUILD)/f32/cuda.$(if $(CUDA_OBJ),sm_$(CUDA_ARCH)$(if $(CUDNN_FE_INC),-cudnn),off)
$(BUILD)/f32/kernels/backend.o $(BUILD)/f32/dist/dist.o $(CUDA_OBJ): $(CUDA_STAMP)
$(CUDA_STAMP):
	@mkdir -p $(dir $@) && rm -f $(BUILD)/f32/cuda.* $(BUILD)/tests/cuda_ops && touch $@
ifneq ($(CUDA_OBJ),)
$(BUILD)/f32/kernels/cuda/%.o: kernels/cuda/%.cu | $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@
$(BUILD)/f32/kernels/cuda/%.o: kernels/cuda/%.cpp | $(BUILD)/config.mk
	@mkdir -p $(dir $@)
	$(CXX) $(CUDA_CXXFLAGS) -c $< -o $@
$(BUILD)/f32/kernels/backend.o: CFLAGS += -DMOE_CUDA
$(BUILD)/f32/dist/dist.o: CFLAGS += -DMOE_NCCL
$(BUILD)/f32/dist/nccl.o: CFLAGS += -isystem $(patsubst %/bin/nvcc,%,$(NVCC))/include
$(MOE_BIN) $(BUILD)/bench $(BUILD)/tests/optim_ref_f32 $(BUILD)/tests/cuda_ops: LDLIBS += $(CUDA_LIBS)
$(MOE_BIN) $(BUILD)/bench: LDLIBS += -lnccl
$(BUILD)/tests/cuda_ops: $(BUILD)/f32/tests/cuda/test_cuda_ops.o \
    $(filter $(BUILD)/f32/base/% $(BUILD)/f32/kernels/%,$(F32_LIB))
	@mkdir -p $(dir $@)
	$(CC) -o $@ $^ $(LDLIBS)
test: $(BUILD)/tests/cuda_ops
endif

# Op suites link only base and the kernels, so they build while the model is being written.
F64_KERNELS := $(filter $(BUILD)/f64/base/% $(BUILD)/f64/kernels/%,$(F64_LIB))
$(BUILD)/tests/test_ops_%: $(BUILD)/f64/tests/test_ops_%.o $(F64_TESTLIB) $(F64_KERNELS)
	@mkdir -p $(dir $@)
	$(CC) -o $@ $^ $(LDLIBS) -lcmocka

$(BUILD)/tests/%: $(BUILD)/f64/tests/%.o $(F64_TESTLIB) $(F64_LIB) $(F64_TRAIN)
	@mkdir -p $(dir $@)
	$(CC) -o $@ $^ $(LDLIBS) -lcmocka

# tests/reference/test_adamw_torch.py drives AdamW through tests/optim_ref.c, once per
# precision. It links only the rooms it uses (kernels, model, optim), like the op suites.
OPTIM_REF := $(BUILD)/tests/optim_ref_f32 $(BUILD)/tests/optim_ref_f64
optim_ref_objs = $(filter $(BUILD)/$(1)/base/% $(BUILD)/$(1)/kernels/% $(BUILD)/$(1)/model/% \
    $(BUILD)/$(1)/optim/%,$(2))
$(BUILD)/tests/optim_ref_f32: $(BUILD)/f32/tests/optim_ref.o $(call optim_ref_objs,f32,$(F32_LIB))
	@mkdir -p $(dir $@)
	$(CC) -o $@ $^ $(LDLIBS)
$(BUILD)/tests/optim_ref_f64: $(BUILD)/f64/tests/optim_ref.o $(call optim_ref_objs,f64,$(F64_LIB))
	@mkdir -p $(dir $@)
	$(CC) -o $@ $^ $(LDLIBS)

test: deps-test $(MOE_BIN) $(TEST_SUITES) $(OPTIM_REF)
	MOE_BIN=$(abspath $(MOE_BIN)) MOE_BUILD=$(abspath $(BUILD)) $(PYTHON_REF) -m pytest -q -rs -p no:cacheprovider tests

deps:
	@m="$(call missing_pkgs,$(BUILD_PKGS))"; $(call apt_install,$$m)

deps-test: deps
	@m="$(call missing_pkgs,$(TEST_PKGS))"; $(call apt_install,$$m)
	@$(PYTHON_REF) -c 'import safetensors' 2>/dev/null || { \
	    echo "moe: installing $(TEST_PIP) from PyPI for $(PYTHON_REF)"; \
	    $(PYTHON_REF) -m pip install -q --break-system-packages \
	        --root-user-action=ignore --disable-pip-version-check $(TEST_PIP); }
	@$(TOK_VENV)/bin/python -c 'import tokenizers, sentencepiece, transformers, google.protobuf' 2>/dev/null || { \
	    echo "moe: installing $(TOK_PIP) from PyPI into $(TOK_VENV)"; \
	    $(PYTHON_REF) -m venv $(TOK_VENV) && $(TOK_VENV)/bin/pip install -q \
	        --disable-pip-version-check $(TOK_PIP); }
	@$(HF_VENV)/bin/python -c 'import transformers' 2>/dev/null || { \
	    echo "moe: installing $(HF_PIP) from PyPI into $(HF_VENV)"; \
	    $(PYTHON_REF) -m venv --system-site-packages $(HF_VENV) && \
	    $(HF_VENV)/bin/pip install -q --disable-pip-version-check $(HF_PIP); }

# Installs the packages named in $(1) (a shell word list), as root or through sudo.
apt_install = if [ -n "$(1)" ]; then \
    echo "moe: installing missing Debian packages: $(1)"; \
    if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
    else echo "moe: error: need root to install $(1)"; \
         echo "HINT: run 'apt-get install $(1)' as root, then make again"; exit 1; fi; \
    $$SUDO apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(1); \
    fi

clean:
	rm -rf $(BUILD) $(MOE_BIN)

# The benchmark links what ./moe links but the CLI's main (bench/bench.c has its own).
BENCH_OBJ := $(patsubst %.c,$(BUILD)/f32/%.o,$(wildcard bench/*.c)) $(F32_LIB) \
    $(filter-out $(BUILD)/f32/train/cli/main.o,$(F32_TRAIN))
$(BUILD)/bench: $(BENCH_OBJ)
	$(CC) -o $@ $^ $(LDLIBS)

.PHONY: bench bench-peer bench-gpu bench-gpu-peer bench-dist
bench: $(BUILD)/bench
	$(BUILD)/bench
	$(BUILD)/bench --gpu --csv bench-gpu.csv

bench-peer: $(BUILD)/bench
	@$(TORCH_VENV)/bin/python -c 'import torch' 2>/dev/null || { \
	    echo "moe: installing $(TORCH_PIP) from PyPI into $(TORCH_VENV) (about 5 GB)"; \
	    $(PYTHON_REF) -m venv $(TORCH_VENV) && $(TORCH_VENV)/bin/pip install -q \
	        --disable-pip-version-check $(TORCH_PIP); }
	$(BUILD)/bench --peer --steps 5 --python $(PYTHON_REF) --python $(TORCH_VENV)/bin/python \
	    configs/small.ini

# configs/small.ini in one process and under mpirun -np 2 (DP, ZeRO-1, EP): tokens/s, bytes
# per step and the share of time in collectives (bench/dist_bench.sh).
bench-dist: $(MOE_BIN)
	bash bench/dist_bench.sh ./$(MOE_BIN)

# The GPU part alone (make bench runs it too; without a GPU it says why and passes), and
# moe.c against PyTorch on the GPU (bench/torch_gpu_ref.py: eager and torch.compile).
bench-gpu: $(BUILD)/bench
	$(BUILD)/bench --gpu --csv bench-gpu.csv

bench-gpu-peer: $(BUILD)/bench
	$(BUILD)/bench --gpu-peer --steps 5 configs/gpu-medium.ini

# The GPU checks for a machine without Debian's packages: .gpu/bundle.tar.xz holds the
# binaries and their libraries; tests/cuda/gpu_check.sh runs everything there.
.PHONY: gpu-bundle
gpu-bundle: moe $(BUILD)/bench $(if $(CUDA_OBJ),$(BUILD)/tests/cuda_ops)
	bash tests/cuda/make_bundle.sh

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

# The main job: the default corpus, then the CPU demo model (configs/tiny.ini).
.PHONY: demo
demo: moe
	./moe prepare
	./moe train configs/tiny.ini

# ---- fuzzing (README, "Fuzzing and sanitizers") ----------------------------------------
# One libFuzzer target per reader of outside input: tests/fuzz/<target>.c, seed corpus
# tests/fuzz/<target>/. clang builds them (libFuzzer is clang's) with ASan and UBSan, from
# the f32 sources, under build/fuzz; OpenMP comes from LLVM's runtime there (-O1 leaves
# GCC's omp simd loops scalar: -Wno-pass-failed). Each run
# ends with one line per target (runs, execs/s, findings) and fails on a finding; the
# input that found it is kept in build/fuzz/findings/.
FUZZ_CC := clang
FUZZ_BUILD := build/fuzz
FUZZ_SECONDS ?= 60
FUZZ_PKGS := clang libclang-rt-dev libomp-dev
FUZZ_TARGETS := $(filter-out fuzzlib,$(basename $(notdir $(wildcard tests/fuzz/*.c))))
FUZZ_SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_CFLAGS = -std=c11 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Wno-pass-failed -fopenmp \
    -D_GNU_SOURCE -MMD -MP $(FUZZ_SAN) -fsanitize=fuzzer-no-link $(PKG_CFLAGS)
FUZZ_LIB := $(patsubst %.c,$(FUZZ_BUILD)/obj/%.o,$(LIB_SRC) \
    $(filter-out train/cli/main.c,$(TRAIN_SRC)) tests/fuzz/fuzzlib.c) \
    $(patsubst %.cpp,$(FUZZ_BUILD)/obj/%.o,$(LIB_CPP))

.PHONY: fuzz fuzz-smoke fuzz-build deps-fuzz
deps-fuzz: deps
	@m="$(call missing_pkgs,$(FUZZ_PKGS))"; $(call apt_install,$$m)
$(FUZZ_BUILD)/deps.stamp: Makefile | $(BUILD)/config.mk
	@$(MAKE) --no-print-directory deps-fuzz
	@mkdir -p $(dir $@) && touch $@

$(FUZZ_BUILD)/obj/%.o: %.c | $(BUILD)/config.mk $(FUZZ_BUILD)/deps.stamp
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@
$(FUZZ_BUILD)/obj/%.o: %.cpp | $(BUILD)/config.mk $(FUZZ_BUILD)/deps.stamp
	@mkdir -p $(dir $@)
	$(FUZZ_CC)++ -std=c++17 -O1 -g -fno-omit-frame-pointer -MMD -MP $(FUZZ_SAN) \
	    -fno-sanitize=vptr -fsanitize=fuzzer-no-link -c $< -o $@
$(FUZZ_BUILD)/bin/%: $(FUZZ_BUILD)/obj/tests/fuzz/%.o $(FUZZ_LIB)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -fsanitize=fuzzer $(FUZZ_SAN) -fopenmp -o $@ $^ $(PKG_LIBS) -lcsv -lz -lm $(TOKENIZER_LIBS)
.SECONDARY: $(FUZZ_LIB) $(patsubst %,$(FUZZ_BUILD)/obj/tests/fuzz/%.o,$(FUZZ_TARGETS))

fuzz-build: $(patsubst %,$(FUZZ_BUILD)/bin/%,$(FUZZ_TARGETS))
fuzz: fuzz-build
	bash tests/fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_TARGETS)
fuzz-smoke: fuzz-build
	bash tests/fuzz/run.sh $(FUZZ_BUILD) 20 $(FUZZ_TARGETS)
