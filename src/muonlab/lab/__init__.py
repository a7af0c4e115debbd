"""Layer 4, the lab: models, data, training, comparisons, reports and analysis tools.

The lab uses only the public API of layers 1-3 (``muonlab.orthogonalize``, ``muonlab.Muon``...).
"""
