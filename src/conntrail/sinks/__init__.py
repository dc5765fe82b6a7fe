"""Sinks: where formatted records leave conntrail (stdout, files, databases …)."""
