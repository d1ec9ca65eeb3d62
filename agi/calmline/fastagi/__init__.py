"""The FastAGI layer: the wire, the channel an action talks to, the listener, the session,
and the contract every action implements. It never imports an action."""
