"""The protocol every stage shares: validation split, linear solver, intervals, metrics.json, saved heads."""
