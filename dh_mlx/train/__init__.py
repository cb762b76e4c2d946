"""Training: data pipeline (`data`), and the trainer built on it."""
