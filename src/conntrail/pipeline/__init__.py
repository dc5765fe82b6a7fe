"""The pipeline: sources → enrichers → filters → sinks, each sink behind a bounded queue."""
