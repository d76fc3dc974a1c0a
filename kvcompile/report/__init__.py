"""Reports: Markdown + PNG plots from calibration, maps and benchmark results."""
