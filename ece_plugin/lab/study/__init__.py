"""Studies and benchmarks behind the ``ece-plugin`` commands: method adapters (baselines.py), the runner,
comparison tables and the speed benchmark (bench.py), the layer sweep and the batch-size study (Yoon et al.
2024), and their plots."""
