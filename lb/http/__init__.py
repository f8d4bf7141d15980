"""HTTP/1.1 on the wire: head parsing and rendering, body framing, forwarded headers, cookies, routes,
and who the client is (PROXY protocol header, trusted X-Forwarded-For).  [pure]
"""
