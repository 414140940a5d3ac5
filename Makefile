# Developer shortcuts for the commands the README documents (its "Development" section).
.PHONY: install lint test bench

install:
	python -m pip install '.[test]'

# ruff and mypy come with '.[test]' (make install), pinned; .ci/run runs them too.
lint:
	ruff check uvkerneld kernel_stub tests bench
	mypy uvkerneld kernel_stub

# The README's test command, exactly as CI (.ci/run) runs it.
test:
	python -m pip install '.[test]' && python -m pytest

bench:
	python -m bench
