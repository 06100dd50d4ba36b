# Shortcuts; the scripts are the source of truth.
.PHONY: demo test bench fmt
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench:
	cargo bench --bench proxy_load
fmt:
	cargo fmt --all
