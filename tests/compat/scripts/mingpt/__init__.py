# Source: karpathy/minGPT, mingpt/__init__.py (commit 37baab71b9abea1b76ab957409a1cc2fbfba8a26).
#   MIT licence, Copyright (c) 2020 Andrej Karpathy.
# Vendored (empty there too), so that mingpt_adder.py keeps its `from mingpt.model import GPT` lines.
