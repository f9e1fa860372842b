"""Building the compiled step: the train state's plan, the pure step functions, batch-size search."""
