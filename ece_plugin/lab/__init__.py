"""The lab around the method: the command line (``cli``), the studies and benchmarks (``study``), the fact-world
testbed builder (``testbed``) and explanations (``explain``). It depends on the method; the method never on it."""
