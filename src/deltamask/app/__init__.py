"""What users run: the CLI, the codec tool, compare suites, benchmarks."""
