"""WebSocket: upgrade checks (RFC 6455 §4.2.1) and frame boundaries for injected closes.  [pure]
"""
