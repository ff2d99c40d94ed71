# One entry point per developer task; every target sets up what it needs first.
.PHONY: setup run test lint protos bench clean

PY := .venv/bin/python

setup:
	@scripts/setup

run: setup
	$(PY) -m services.cli.main demo

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

protos: setup
	$(PY) protos/generate.py

bench: setup
	for b in idle_memory registry_vs_distribution tls_serving dht_hops dht_latency lease_latency discovery_maintenance import_throughput p2p_mesh first_pull; do \
		$(PY) -m bench.$$b || exit 1; done

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache .run

# docs/status-page.png: a 3-node loopback mesh, one pull, node 3's /status in headless Chromium.
.PHONY: screenshot
screenshot: setup
	$(PY) -m scripts.screenshot
