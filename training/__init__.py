"""Command-line programs built on kerasbn: train, export, demo, benchmark, and their parts."""
