# Kestrel's two entry points:
#   make demo   the local cluster, the images, the operator and a short autoscaling demo
#   make test   every test, unit to end to end (what .ci/run runs)
# Long steps print what they do; logs are named where they are written.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
ROOT := $(CURDIR)
CLUSTER := $(ROOT)/e2e/cluster
export KUBECONFIG ?= $(CLUSTER)/.run/kubeconfig
export PATH := $(CLUSTER)/.build/bin:$(PATH)
# Model and ONNX Runtime for the worker (written by worker/scripts/setup-dev).
WORKER_ENV := $(ROOT)/.cache/worker.env

.PHONY: help deps test lint unit e2e smoke setup cluster-up cluster-down images demo demo-down crds

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

test: lint unit e2e ## every test: lint, unit, then the local cluster's e2e suite

lint: ## formatting, clippy, and the CRD/API-doc drift checks
	@echo "== lint: cargo fmt --check, clippy -D warnings"
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

setup: ## install the model and the worker's Python tooling into .cache/ (idempotent)
	@echo "== setup: model + ONNX variants + Python baselines into .cache/ (first run: several minutes)"
	@mkdir -p .cache && worker/scripts/setup-dev > $(WORKER_ENV).tmp && mv $(WORKER_ENV).tmp $(WORKER_ENV) && cat $(WORKER_ENV)

deps: ## system packages the unit tests need (Debian's prometheus for the PromQL test)
	@command -v prometheus >/dev/null || { echo "== deps: apt-get install prometheus"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

unit: deps setup ## unit and component tests of every crate (no cluster needed)
	@echo "== unit: cargo test --workspace (except the cluster suite)"
	set -a; source $(WORKER_ENV); set +a; cargo test --no-fail-fast --workspace --exclude kestrel-e2e

cluster-up: ## build (cached) and start the local single-node Kubernetes
	$(CLUSTER)/up

cluster-down: ## stop the local cluster and remove what it made
	$(CLUSTER)/down

images: setup ## build the operator and worker binaries and import their images
	@echo "== images: release builds, then kestrel-operator:dev and kestrel-worker:dev into the node"
	cargo build --release -p kestrel-operator
	worker/scripts/build-image kestrel-worker:dev
	$(CLUSTER)/image kestrel-operator:dev target/release/kestrel-operator

smoke: ## the local cluster's smoke test
	$(CLUSTER)/smoke

e2e: cluster-up images smoke ## the end-to-end suite on the local cluster (or KUBECONFIG's)
	@echo "== e2e: deploy/check (chart, rendered manifests, alert rules, examples)"
	deploy/check
	@echo "== e2e: cargo test -p kestrel-e2e against $(KUBECONFIG)"
	cargo build -p kestrel-operator
	set -a; source $(WORKER_ENV); set +a; cargo test --no-fail-fast -p kestrel-e2e -- --test-threads=4

demo: setup ## the local cluster, Kestrel via Helm, the example, a trace replay, a summary
	scripts/demo

demo-down: ## undo make demo: uninstall, delete namespace search, stop the cluster
	-helm uninstall kestrel -n kestrel-system
	-kubectl delete namespace search --wait=false
	$(CLUSTER)/down

crds: ## regenerate crds/generated and docs/api.md from the Rust types
	cargo run -q -p kestrel-crds --bin crdgen > crds/generated/kestrel.dev_modeldeployments.yaml
	cargo run -q -p kestrel-crds --bin apidoc > docs/api.md
