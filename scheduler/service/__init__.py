"""The Corral service: API, persistence, scheduling loop and executors around the pure engine."""
