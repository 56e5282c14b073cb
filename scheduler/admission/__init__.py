"""Admission policies: declarative rules (and one hook) checked when a job is submitted or a sandbox spawned."""
