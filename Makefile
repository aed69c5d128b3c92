# The two commands of the README: `make run` (the service, with a local nats-server) and `make test`.
.PHONY: setup run test lint fuzz deploy-check browser-test bench bench-smoke bench-presence

setup:
	scripts/setup.sh

run:
	scripts/run.sh

test:
	scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# Property tests of the frame decoder and the NATS envelope parser with many cases (bounded time in CI).
fuzz:
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} cargo test --locked --lib fuzz_

# Static checks of deploy/ (compose, k8s, env files against the gateway's real configuration keys).
deploy-check:
	python3 tests/deploy/validate.py

# examples/browser in headless Chromium against the real gateway (installs Chromium with apt-get if missing).
browser-test:
	scripts/browser-test.sh

# Load benchmark against nats-server's WebSocket listener (docs/benchmarks.md): the full run, and the short
# form CI runs so that the tool keeps working.
bench:
	scripts/bench.sh

bench-smoke:
	scripts/bench.sh --smoke

# Presence benchmark (docs/presence-benchmark.md).
bench-presence:
	scripts/bench-presence.sh
