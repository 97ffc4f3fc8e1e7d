.PHONY: demo test bench lint

demo:   ## run the main job end to end on the embedded backend
	scripts/demo.sh

test:   ## install what the tests need and run them all
	scripts/test.sh

bench:  ## the transport benchmark (prints ratios against bare pyzmq)
	scripts/setup-venv.sh test
	.venv/bin/python benchmarks/transport.py

lint:
	.venv/bin/ruff check .
