"""The program Jupyter launches (see kernel.json): ask uvkerneld for this notebook's venv, then
exec ipykernel inside it. Standard library only, and small: it runs on every kernel start."""
