"""Formats: pure functions from a record to the bytes a sink writes."""
