# Front door for people; CMake does the building.
#   make test    install deps, check that clang (with the libFuzzer targets)
#                and gcc -O3 build warning-free, then build with ASan+UBSan
#                (gcc) and run every test; the test summary is the last thing
#                printed.  Before that, a small ThreadSanitizer build of the
#                tracker's concurrency test (test-tsan)
#   make build   optimised build in build/ (bin: build/kdkit)
#   make bench   run the benchmarks in bench/ (installs the peers first,
#                quietly) and print a table of every figure vs its target
#   make python  build libkdkit and a virtual environment of /usr/bin/python3
#                (seeing Debian's numpy and torch) where `import kdkit`
#                works: build/venv/bin/python (docs/python.md)
#   make run     the main job: the whole distillation pipeline on built-in
#                defaults into kd_run/ (scripts/kd_pipeline.sh: a teacher
#                GPT trained, served on loopback, a KD mix made through it,
#                a smaller student distilled from the mix, status and eval;
#                about 5 minutes on 2 cores); run it again and every stage
#                resumes or is reused, paying nothing twice
JOBS ?= 2

.PHONY: all deps build test test-asan test-tsan clang-check release-check bench run clean python

all: build

deps:
	@./scripts/install-deps.sh

build: deps
	@cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DKD_BUILD_TESTS=OFF >/dev/null
	@cmake --build build -j$(JOBS)

test-asan: deps
	@cmake -S . -B build-asan -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKD_SANITIZE=ON >/dev/null
	@cmake --build build-asan -j$(JOBS)
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --test-dir build-asan --output-on-failure -j$(JOBS)

clang-check: deps
	@cmake -S . -B build-clang -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Release -DKD_FUZZ=ON >/dev/null
	@cmake --build build-clang -j$(JOBS)

# gcc at -O3 warns about things -O1 does not see; make run and make bench
# build that way (make bench with the tests and benchmarks, so they are built
# here too).
release-check: deps
	@cmake -S . -B build-release-check -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build build-release-check -j$(JOBS)

# ThreadSanitizer: a small separate build of the concurrency test only.
test-tsan: deps
	@cmake -S . -B build-tsan -DCMAKE_C_COMPILER=gcc -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKD_TSAN=ON >/dev/null
	@cmake --build build-tsan -j$(JOBS)
	@TSAN_OPTIONS=halt_on_error=1 build-tsan/tests/tsan/test_tracker_threads

test: clang-check release-check test-tsan test-asan

# Package installation and the build go to build/bench-setup.log (shown only
# when they fail), so make bench prints the benchmarks' own lines and ends
# with bench/run.sh's table of every figure against its target.
bench:
	@mkdir -p build
	@./scripts/install-deps.sh --bench >build/bench-setup.log 2>&1 || { cat build/bench-setup.log; exit 1; }
	@cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >>build/bench-setup.log 2>&1 || { tail -40 build/bench-setup.log; exit 1; }
	@cmake --build build -j$(JOBS) >>build/bench-setup.log 2>&1 || { tail -40 build/bench-setup.log; exit 1; }
	@./bench/run.sh build

python: build
	@./scripts/python-venv.sh build/venv

run: build
	@./scripts/kd_pipeline.sh build kd_run

clean:
	rm -rf build build-asan build-clang build-release-check build-tsan
