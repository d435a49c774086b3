"""Mail syntax shared by intake and delivery: addresses and header sections."""
