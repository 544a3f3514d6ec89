"""Chat datasets: read, validate, split and report on uploads; generate sample data."""
