"""The benchmark behind ``make bench``: payload tiers, in-process and HTTP timings, memory, the no-prefetch path.

``python -m bench.run`` measures everything in one run, prints a table and writes ``bench/results.json``;
``python -m bench.profile`` profiles the in-process request path of one tier with cProfile.
"""
