.PHONY: demo test bench soak lint

demo:   ## run the main job end to end on the embedded backend
	scripts/demo.sh

test:   ## install what the tests need and run them all
	scripts/test.sh

bench:  ## every benchmark (ratios against a baseline measured in the same run; plots in benchmarks/plots/)
	scripts/setup-venv.sh test
	.venv/bin/python -m benchmarks

soak:   ## ten minutes of random worker churn: rounds, lost updates, coordinator memory
	scripts/setup-venv.sh test
	.venv/bin/python benchmarks/soak.py

lint:
	.venv/bin/ruff check .
