# fpxint — the two commands that matter: `make demo` and `make test`.
# Every target does its own set-up (Debian packages via scripts/setup.sh, configure, build).

BUILD_DIR ?= build
JOBS      ?= 2
CMAKE_FLAGS ?=

.PHONY: all setup configure build models test test-long test-asan test-tsan tsan-build fuzz-build fuzz demo bench eval clean help

all: build

help:
	@echo "make demo    end-to-end demo on a real model (sets up, builds, fetches only that model)"
	@echo "make test    build and run every test (what CI runs)"
	@echo "make test-long  the long fault run: 20 kill -9 trials at random points (docs/RELIABILITY.md)"
	@echo "make build   configure and build into $(BUILD_DIR)/ (binaries in $(BUILD_DIR)/bin/)"
	@echo "make bench   run the Google Benchmark suite (docs/BENCHMARKS.md)"
	@echo "make eval    full accuracy sweep on the real models (~40 min; docs/RESULTS.md, docs/results/)"
	@echo "make test-asan  every test under AddressSanitizer + UBSan (build-asan/)"
	@echo "make test-tsan  worker pool, job manager and service tests under ThreadSanitizer (build-tsan/)"
	@echo "make fuzz    run every libFuzzer target for FPXINT_FUZZ_SECONDS (default 300) each"
	@echo "make models  fetch the real models into the cache (scripts/fetch_models.sh)"
	@echo "make setup   install the Debian packages the project needs"

setup:
	@scripts/setup.sh

# Configure (again) whenever asked: cheap, and picks up the models directory.
configure: setup
	@models_dir=$$(scripts/fetch_models.sh --print-dir); \
	cmake -S . -B $(BUILD_DIR) -G Ninja -DFPXINT_MODELS_DIR="$$models_dir" $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j$(JOBS)

models: setup
	@scripts/fetch_models.sh >/dev/null

# The fuzz build: clang + libFuzzer + ASan/UBSan over the parsers of untrusted bytes, and the
# core unit tests under the same sanitizers (build-fuzz/, no LibTorch).
FUZZ_DIR ?= build-fuzz
fuzz-build: setup
	@models_dir=$$(scripts/fetch_models.sh --print-dir); \
	cmake -S . -B $(FUZZ_DIR) -G Ninja -DFPXINT_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DFPXINT_MODELS_DIR="$$models_dir" >/dev/null
	@cmake --build $(FUZZ_DIR) -j$(JOBS)

test: build models fuzz-build tsan-build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j$(JOBS) -LE long
	@cd $(FUZZ_DIR) && ctest --output-on-failure -j$(JOBS)
	@$(MAKE) --no-print-directory test-tsan

# The long fault run (20 kill -9 trials at random points; docs/RELIABILITY.md).
test-long: build models
	@cd $(BUILD_DIR) && ctest --output-on-failure -L long

fuzz: fuzz-build
	@cd $(FUZZ_DIR) && FPXINT_FUZZ_SECONDS=$${FPXINT_FUZZ_SECONDS:-300} ctest --output-on-failure -j$(JOBS) -R '^fuzz\.' -V

# AddressSanitizer + UndefinedBehaviorSanitizer build of every test, in build-asan/.
test-asan: setup models
	@models_dir=$$(scripts/fetch_models.sh --print-dir); \
	cmake -S . -B build-asan -G Ninja -DFPXINT_SANITIZE=ON -DFPXINT_BUILD_BENCH=OFF \
	  -DFPXINT_MODELS_DIR="$$models_dir" >/dev/null
	@cmake --build build-asan -j$(JOBS)
	@cd build-asan && ctest --output-on-failure -j$(JOBS) -LE long

# ThreadSanitizer build (clang) of the worker pool, job manager and service tests, in build-tsan/
# (tests/tsan/ makes Debian's uninstrumented Abseil visible to TSan). LibTorch's OpenMP runtime is
# not instrumented either, so its intra-op threads are set to 1; fpxint's own pools stay parallel.
TSAN_TESTS ?= ^(tsan\.canary_.*|core\.(thread_pool|expansion|artifact|lowbit_linear|int_linear)|server\.(in_process|repository|jobs))$$
tsan-build: setup models
	@models_dir=$$(scripts/fetch_models.sh --print-dir); \
	cmake -S . -B build-tsan -G Ninja -DFPXINT_TSAN=ON -DFPXINT_BUILD_BENCH=OFF \
	  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DFPXINT_MODELS_DIR="$$models_dir" >/dev/null
	@cmake --build build-tsan -j$(JOBS) --target thread_pool_test expansion_test artifact_test \
	  lowbit_linear_test int_linear_test server_test repository_test jobs_test tsan_canary

test-tsan: tsan-build
	@cd build-tsan && OMP_NUM_THREADS=1 \
	  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$(CURDIR)/tests/tsan/suppressions.txt" \
	  ctest --output-on-failure -j1 -R '$(TSAN_TESTS)'

# The demo fetches only the OCR recognizer it shows (scripts/demo.sh: fetch_models.sh --only ocr);
# the CNN and the LM are for `make test` and `make eval`.
demo: build
	@scripts/demo.sh $(BUILD_DIR)

bench: build
	@$(BUILD_DIR)/bin/fpxint-bench --benchmark_counters_tabular=true

# The full accuracy sweep of docs/RESULTS.md (the CI subset is the accuracy.* tests).
eval: build models
	@mkdir -p $(BUILD_DIR)/eval
	@$(BUILD_DIR)/bin/fpxint-eval all --sweep -o $(BUILD_DIR)/eval/results.json
	@/usr/bin/python3 scripts/results_report.py $(BUILD_DIR)/eval/results.json docs/results
	@cp $(BUILD_DIR)/eval/results.json docs/results/results.json

clean:
	rm -rf $(BUILD_DIR) build-asan build-tsan $(FUZZ_DIR)
