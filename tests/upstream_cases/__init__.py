"""One module per upstream fixture family; each defines `run(case)` and is registered in `RUNNERS`."""
