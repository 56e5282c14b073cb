"""The scheduling loop (Core, in loop.py) and its parts: intake, launching, culling, cluster sync, rebuild."""
