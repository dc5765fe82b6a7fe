"""The flow history: lifecycle rows built from events, stores (SQLite, PostgreSQL), queries."""
