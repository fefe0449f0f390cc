"""Reports: scripted end-to-end measurements printed as tables (``python -m rftlib.reports.<name>``)."""
