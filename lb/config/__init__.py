"""Configuration: the frozen model, durations, and loading (${ENV} and ${file:} expansion, validation
with every problem keyed by its path).  [pure after the read]
"""
