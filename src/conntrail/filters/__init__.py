"""Filter expressions that select flow events (see `conntrail.filters.match`)."""
