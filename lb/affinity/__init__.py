"""Session affinity: the token codec, where the token travels (cookie, header, query), the decision
(sticky, new, redispatch) and balancing (round_robin, least_conn, source, hash).  [pure]
"""
