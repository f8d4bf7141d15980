"""In-memory runtime state: pools and backend states, rate limits, counters and histograms.
[pure: no I/O, no clock; times come in as arguments]
"""
