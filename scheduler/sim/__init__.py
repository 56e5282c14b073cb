"""The simulator: scenario and trace replay on a virtual clock, baselines, reports, trace importers."""
