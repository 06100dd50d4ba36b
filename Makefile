# Shortcuts; the scripts are the source of truth.
.PHONY: demo test bench bench-load bench-micro fmt
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
bench: bench-load bench-micro
bench-load:
	cargo bench --bench proxy_load
bench-micro:
	cargo bench --bench assignment --bench features --bench drift --bench records
fmt:
	cargo fmt --all
