"""Enrichers: stages that add to an event what the kernel did not put in it."""
