"""Demo scenarios run with ``aiflow demo NAME``."""
