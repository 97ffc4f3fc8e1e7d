.PHONY: demo test bench soak lint

demo:   ## run the main job end to end on the embedded backend
	scripts/demo.sh

test:   ## install what the tests need and run them all
	scripts/test.sh

bench:  ## the benchmarks (each prints ratios against a baseline measured in the same run)
	scripts/setup-venv.sh test
	.venv/bin/python benchmarks/transport.py
	.venv/bin/python benchmarks/membership.py
	.venv/bin/python benchmarks/async_vs_sync.py
	.venv/bin/python benchmarks/fed_rules.py
	.venv/bin/python benchmarks/codecs.py
	.venv/bin/python benchmarks/curve.py

soak:   ## ten minutes of random worker churn: rounds, lost updates, coordinator memory
	scripts/setup-venv.sh test
	.venv/bin/python benchmarks/soak.py

lint:
	.venv/bin/ruff check .
