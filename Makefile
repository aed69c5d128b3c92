# The two commands of the README: `make run` (the service, with a local nats-server) and `make test`.
.PHONY: setup run test lint

setup:
	scripts/setup.sh

run:
	scripts/run.sh

test:
	scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets --locked -- -D warnings
