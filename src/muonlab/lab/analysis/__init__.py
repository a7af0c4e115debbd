"""Analysis tools: Newton-Schulz convergence, optimizer paths, memory and spectra."""
