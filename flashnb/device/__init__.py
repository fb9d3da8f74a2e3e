"""The flash device: its measured profile (measure, profile) and the paper's cost model (costmodel)."""
