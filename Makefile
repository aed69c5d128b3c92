# The two commands of the README: `make run` (the service, with a local nats-server) and `make test`.
.PHONY: setup run test lint fuzz

setup:
	scripts/setup.sh

run:
	scripts/run.sh

test:
	scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings

# Property tests of the frame decoder and the NATS envelope parser with many cases (bounded time in CI).
fuzz:
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} cargo test --locked --lib fuzz_
