"""Command-line programs built on kerasbn: data, models, train, export, benchmark."""
