"""The local evidence journal (invariant I3): records, segments with group fsync, replay."""
