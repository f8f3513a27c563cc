"""Command-line tools: checkpoint conversion, data preparation, benchmarks."""
