"""The data plane per client connection: a sans-I/O state machine (`connection`) and its asyncio shell (`server`)."""
