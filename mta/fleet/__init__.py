"""The fleet: inventory, node admin client, drain/isolate/reroute, controller (fleet issue)."""
